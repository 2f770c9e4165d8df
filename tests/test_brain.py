"""Tests of cgc_refine.brain: brain masks, robust normalisation and the CT window.

All volumes are small synthetic phantoms built here; expected values are worked out by hand
in the comments.
"""

from __future__ import annotations

import numpy as np
import pytest

from cgc_refine.brain import (
    CT_BRAIN_LEVEL,
    CT_BRAIN_WIDTH,
    ct_window,
    derive_brain_mask,
    robust_normalise,
)
from cgc_refine.exceptions import CGCRefineError, EmptyMaskError, InvalidImageError


def ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    """Boolean ball of ``radius`` voxels around ``centre`` (voxel coordinates)."""
    grid = np.indices(shape, dtype=np.float64)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return d2 <= radius**2


SHAPE = (32, 32, 24)
CENTRE = (15.5, 15.5, 11.5)


# ------------------------------------------------------------------------ derive_brain_mask (MRI)


def test_mri_mask_zero_background_is_exactly_the_brain() -> None:
    rng = np.random.default_rng(0)
    brain = ball(SHAPE, CENTRE, 10)
    image = np.zeros(SHAPE, np.float32)
    # strictly positive tissue values, so no brain voxel equals the background value 0
    image[brain] = rng.uniform(50.0, 150.0, int(brain.sum()))
    mask = derive_brain_mask(image)
    assert mask.dtype == bool
    assert mask.shape == SHAPE
    np.testing.assert_array_equal(mask, brain)


def test_mri_mask_negative_constant_background_zscored() -> None:
    # A z-scored skull-stripped image: the background is a negative constant (here -1.7)
    # and brain voxels are ~N(0, 1), some of them negative and some exactly 0.
    rng = np.random.default_rng(1)
    brain = ball(SHAPE, CENTRE, 10)
    image = np.full(SHAPE, -1.7, np.float32)
    values = rng.normal(0.0, 1.0, int(brain.sum())).astype(np.float32)
    values[:5] = 0.0  # a brain value of exactly 0 is tissue, not background
    values[values == np.float32(-1.7)] = -1.71
    image[brain] = values
    mask = derive_brain_mask(image, modality="mri")
    np.testing.assert_array_equal(mask, brain)
    # a mask that took 0 as background would miss these voxels and keep the whole outside
    assert not mask[~brain].any()


def test_mri_mask_several_channels_is_the_union() -> None:
    rng = np.random.default_rng(2)
    left = ball(SHAPE, (11.5, 15.5, 11.5), 6)
    right = ball(SHAPE, (21.5, 15.5, 11.5), 6)
    assert (left & ~right).any() and (right & ~left).any()
    channel0 = np.zeros(SHAPE, np.float32)
    channel0[left] = rng.uniform(1.0, 2.0, int(left.sum()))
    channel1 = np.full(SHAPE, -3.0, np.float32)  # a z-scored channel with its own background
    channel1[right] = rng.uniform(-1.0, 1.0, int(right.sum()))
    mask = derive_brain_mask(np.stack([channel0, channel1]))
    np.testing.assert_array_equal(mask, left | right)


def test_mri_mask_without_constant_background_keeps_whole_field_of_view(caplog) -> None:
    # pure noise: no value covers 5% of the voxels -> the whole field of view, with a warning
    rng = np.random.default_rng(3)
    image = rng.normal(0, 1, SHAPE).astype(np.float32)
    with caplog.at_level("WARNING", logger="cgc_refine.brain"):
        mask = derive_brain_mask(image)
    assert mask.all()
    assert "no constant background" in caplog.text


def test_mri_mask_constant_image_is_empty_mask_error() -> None:
    with pytest.raises(EmptyMaskError, match="empty"):
        derive_brain_mask(np.zeros(SHAPE, np.float32))
    with pytest.raises(EmptyMaskError):
        derive_brain_mask(np.full((2, *SHAPE), -0.5, np.float32))


def test_derive_mask_rejects_bad_modality_and_shape() -> None:
    with pytest.raises(InvalidImageError, match="modality"):
        derive_brain_mask(np.ones(SHAPE), modality="pet")  # type: ignore[arg-type]
    with pytest.raises(InvalidImageError):
        derive_brain_mask(np.ones((4, 4)))


# ------------------------------------------------------------------------- derive_brain_mask (CT)


def ct_head(with_haematoma: bool = True) -> dict[str, np.ndarray]:
    """A synthetic head CT in HU.

    air -1000 HU everywhere; a skull shell (radius 12..14 voxels) of 1000 HU; a thin scalp
    (radius 14..15) of 40 HU soft tissue *outside* the skull; brain (radius < 12) at 30 HU
    with +-3 HU noise; an acute haematoma (ball of radius 3) of 70 HU inside the brain.
    """
    rng = np.random.default_rng(4)
    shape = (36, 36, 36)
    c = (17.5, 17.5, 17.5)
    inner = ball(shape, c, 12)
    skull = ball(shape, c, 14) & ~inner
    scalp = ball(shape, c, 15) & ~ball(shape, c, 14)
    haematoma = ball(shape, (20.5, 15.5, 17.5), 3)
    assert not (haematoma & ~inner).any()
    hu = np.full(shape, -1000.0, np.float32)
    hu[skull] = 1000.0
    hu[scalp] = 40.0
    hu[inner] = 30.0 + rng.uniform(-3.0, 3.0, int(inner.sum()))
    if with_haematoma:
        hu[haematoma] = 70.0
    return {"hu": hu, "brain": inner, "skull": skull, "scalp": scalp, "haematoma": haematoma}


def test_ct_mask_covers_brain_and_haematoma_excludes_skull_air_scalp() -> None:
    head = ct_head()
    mask = derive_brain_mask(head["hu"], modality="ct")
    brain, haematoma = head["brain"], head["haematoma"]
    # the haematoma (70 HU, inside the [-15, 100] HU window) is part of the brain mask
    assert mask[haematoma].all()
    # nothing of the skull, the (disconnected) scalp or the air is in the mask
    assert not mask[head["skull"]].any()
    assert not mask[head["scalp"]].any()
    assert not mask[head["hu"] == -1000.0].any()
    assert not (mask & ~brain).any()
    # the one-voxel opening may shave a few corner voxels off the digital sphere only
    assert mask[brain].mean() > 0.97


def test_ct_mask_uses_channel_zero_in_hu() -> None:
    head = ct_head()
    extra = np.zeros_like(head["hu"])
    mask = derive_brain_mask(np.stack([head["hu"], extra]), modality="ct")
    np.testing.assert_array_equal(mask, derive_brain_mask(head["hu"], modality="ct"))


def test_ct_mask_fills_holes_left_by_out_of_window_voxels() -> None:
    # a calcification (500 HU) inside the brain falls outside [-15, 100] HU; hole filling
    # puts it back in the mask
    head = ct_head(with_haematoma=False)
    hu = head["hu"].copy()
    calc = ball(hu.shape, (15.5, 19.5, 17.5), 1.5)
    hu[calc] = 500.0
    mask = derive_brain_mask(hu, modality="ct")
    assert mask[calc].all()


def test_ct_all_air_is_empty_mask_error() -> None:
    with pytest.raises(EmptyMaskError):
        derive_brain_mask(np.full((16, 16, 16), -1000.0, np.float32), modality="ct")
    # EmptyMaskError belongs to the library's family and is a ValueError
    assert issubclass(EmptyMaskError, CGCRefineError) and issubclass(EmptyMaskError, ValueError)


# --------------------------------------------------------------------------- robust_normalise


def test_robust_normalise_hand_computed_values() -> None:
    # inside values 1..5: q25 = 2, median = 3, q75 = 4 (linear interpolation), so
    # scale = IQR / 1.349 = 2 / 1.349 and x -> (x - 3) * 1.349 / 2:
    # [1, 2, 3, 4, 5] -> [-1.349, -0.6745, 0, 0.6745, 1.349]
    data = np.full((1, 1, 7), 100.0, np.float32)
    data[0, 0, 1:6] = [1, 2, 3, 4, 5]
    mask = np.zeros((1, 1, 7), bool)
    mask[0, 0, 1:6] = True
    out = robust_normalise(data, mask)
    assert out.shape == (1, 1, 1, 7)
    assert out.dtype == np.float32
    np.testing.assert_allclose(
        out[0, 0, 0], [0.0, -1.349, -0.6745, 0.0, 0.6745, 1.349, 0.0], atol=1e-6
    )


def test_robust_normalise_median_zero_iqr_1349_inside_zero_outside() -> None:
    rng = np.random.default_rng(5)
    mask = ball(SHAPE, CENTRE, 10)
    t1 = np.zeros(SHAPE, np.float32)
    t1[mask] = rng.gamma(4.0, 50.0, int(mask.sum())) + 200.0  # skewed intensities
    flair = np.full(SHAPE, 7.0, np.float32)  # non-zero outside: must become 0
    flair[mask] = rng.normal(500.0, 80.0, int(mask.sum()))
    out = robust_normalise(np.stack([t1, flair]), mask)
    assert out.shape == (2, *SHAPE)
    assert out.dtype == np.float32
    for channel in out:
        inside = channel[mask]
        q25, median, q75 = np.percentile(inside, [25, 50, 75])
        assert abs(median) < 1e-5
        assert q75 - q25 == pytest.approx(1.349, abs=1e-4)
        assert np.all(channel[~mask] == 0.0)


def test_robust_normalise_is_insensitive_to_a_few_outliers() -> None:
    rng = np.random.default_rng(6)
    mask = np.ones((20, 20, 25), bool)
    data = rng.normal(100.0, 10.0, mask.shape).astype(np.float32)
    clean = robust_normalise(data, mask)[0]
    spiked = data.copy()
    spiked.flat[:5] = 1e6  # 5 of 10000 voxels: extreme outliers (a z-score would explode)
    dirty = robust_normalise(spiked, mask)[0]
    rest = np.ones(mask.size, bool)
    rest[:5] = False
    rest = rest.reshape(mask.shape)
    # the other voxels barely move: the percentiles shift by ~5/10000 of a quantile step
    assert np.max(np.abs(dirty[rest] - clean[rest])) < 0.01
    # while the mean/std standardisation would have been ruined
    z = (spiked - spiked.mean()) / spiked.std()
    assert np.max(np.abs(z[rest] - clean[rest])) > 0.5


def test_robust_normalise_falls_back_to_std_when_iqr_is_zero() -> None:
    # 90 % of the voxels equal 5: IQR = 0, the scale falls back to the standard deviation
    data = np.full((1, 1, 10), 5.0, np.float32)
    data[0, 0, 0] = 15.0
    mask = np.ones((1, 1, 10), bool)
    out = robust_normalise(data, mask)[0]
    # median 5; std of [15, 5 x 9] = sqrt(mean((x - 6)^2)) = sqrt((81 + 9 * 1) / 10) = 3
    np.testing.assert_allclose(out.ravel(), [10.0 / 3.0] + [0.0] * 9, rtol=1e-6)


def test_robust_normalise_constant_channel_is_invalid_image() -> None:
    mask = ball(SHAPE, CENTRE, 8)
    good = np.zeros(SHAPE, np.float32)
    good[mask] = np.linspace(0.0, 1.0, int(mask.sum()))
    constant = np.where(mask, 42.0, 0.0).astype(np.float32)  # constant inside the mask
    with pytest.raises(InvalidImageError, match="channel 1 is constant"):
        robust_normalise(np.stack([good, constant]), mask)


def test_robust_normalise_empty_mask() -> None:
    with pytest.raises(EmptyMaskError):
        robust_normalise(np.ones(SHAPE, np.float32), np.zeros(SHAPE, bool))


# --------------------------------------------------------------------------------- ct_window


def test_ct_window_default_brain_window() -> None:
    # level 40, width 100: 0 at 40 - 50 = -10 HU, 1 at 40 + 50 = 90 HU, 0.5 at 40 HU;
    # 30 HU -> (30 + 10) / 100 = 0.4; 70 HU -> 0.8; air and bone saturate
    assert (CT_BRAIN_LEVEL, CT_BRAIN_WIDTH) == (40.0, 100.0)
    hu = np.array([-1000.0, -10.0, 30.0, 40.0, 70.0, 90.0, 1000.0])
    out = ct_window(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.4, 0.5, 0.8, 1.0, 1.0], atol=1e-7)


def test_ct_window_custom_level_width() -> None:
    # level 50, width 200: 0 at -50 HU, 1 at 150 HU, 0.5 at 50 HU, 0.25 at 0 HU
    out = ct_window(np.array([-50.0, 0.0, 50.0, 150.0, -51.0, 151.0]), level=50.0, width=200.0)
    np.testing.assert_allclose(out, [0.0, 0.25, 0.5, 1.0, 0.0, 1.0], atol=1e-7)


@pytest.mark.parametrize("width", [0.0, -10.0])
def test_ct_window_rejects_non_positive_width(width: float) -> None:
    with pytest.raises(InvalidImageError, match="width"):
        ct_window(np.zeros(3), width=width)
