"""Tests of cgc_refine.priors.adapters: every prior source becomes a ProbabilityMap.

Synthetic arrays only; expected values are derived by hand in the comments.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from cgc_refine.exceptions import InvalidPriorError
from cgc_refine.priors.adapters import (
    ADAPTER_KINDS,
    as_probability_map,
    check_prior_informative,
    from_labels,
    from_logits,
    from_mask,
    from_probability,
    from_scores,
    infer_prior_kind,
)
from cgc_refine.priors.base import ProbabilityMap

ADAPTER_LOGGER = "cgc_refine.priors.adapters"
AFFINE = np.diag([2.0, 1.0, 0.5, 1.0])


def cube_mask(shape=(8, 8, 8), lo=2, hi=6) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[lo:hi, lo:hi, lo:hi] = 1
    return m


def gaussian_step_profile(sigma_vox: float, n: int) -> np.ndarray:
    """Hand-made reference: a step 0|1 (border between voxels -1 and 0) blurred by the
    sampled, truncated (4 sigma) and normalised Gaussian kernel. Voxel m >= 0 inside gets
    the kernel mass of offsets d >= -m; voxel -1-m outside gets 1 minus that."""
    radius = int(4.0 * sigma_vox + 0.5)
    d = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * d**2 / sigma_vox**2)
    w /= w.sum()
    inside = np.array([w[d >= -m].sum() for m in range(n)])
    return np.concatenate([(1.0 - inside)[::-1], inside])  # voxels -n .. n-1


# --------------------------------------------------------------------------- from_probability


def test_from_probability_valid_map_is_kept() -> None:
    data = np.linspace(0.0, 1.0, 64, dtype=np.float64).reshape(4, 4, 4)
    pm = from_probability(data, AFFINE)
    assert isinstance(pm, ProbabilityMap)
    assert pm.source == "probability"
    assert pm.data.dtype == np.float32
    np.testing.assert_allclose(pm.data, data, atol=1e-7)
    np.testing.assert_array_equal(pm.affine, AFFINE)
    assert pm.params == {"tolerance": 1e-3}


def test_from_probability_slight_overshoot_is_clipped() -> None:
    # interpolation overshoot of 5e-4 on either side is within the default tolerance 1e-3
    data = np.full((2, 2, 2), 0.3, np.float32)
    data[0, 0, 0] = -0.0005
    data[1, 1, 1] = 1.0005
    pm = from_probability(data)
    assert pm.data[0, 0, 0] == 0.0
    assert pm.data[1, 1, 1] == 1.0
    assert pm.data.min() == 0.0 and pm.data.max() == 1.0
    # a larger tolerance accepts a larger overshoot
    data[1, 1, 1] = 1.05
    assert from_probability(data, tolerance=0.1).data.max() == 1.0


@pytest.mark.parametrize("bad", [1.01, -0.01, 7.5])
def test_from_probability_out_of_range_points_to_scores(bad: float) -> None:
    data = np.full((2, 2, 2), 0.5, np.float32)
    data[0, 1, 0] = bad
    with pytest.raises(InvalidPriorError, match="kind='scores'"):
        from_probability(data)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_from_probability_non_finite_is_error(bad: float) -> None:
    data = np.full((3, 3, 3), 0.5, np.float32)
    data[1, 1, 1] = bad
    with pytest.raises(InvalidPriorError, match="NaN/Inf"):
        from_probability(data)


def test_from_probability_shape_handling() -> None:
    # a trailing singleton channel (X, Y, Z, 1) is squeezed; 2-D input is refused
    data = np.full((3, 4, 5, 1), 0.25, np.float32)
    assert from_probability(data).shape == (3, 4, 5)
    with pytest.raises(InvalidPriorError, match="3-D"):
        from_probability(np.zeros((4, 4)))


# --------------------------------------------------------------------------------- from_mask


@pytest.mark.parametrize(
    "mask",
    [
        cube_mask(),
        cube_mask().astype(bool),
        cube_mask().astype(np.float32) * np.float32(0.99999997),  # resampled float mask
    ],
    ids=["uint8", "bool", "float-0.99999997"],
)
def test_from_mask_binary_inputs(mask: np.ndarray) -> None:
    pm = from_mask(mask, AFFINE)
    assert pm.source == "mask"
    assert pm.data.dtype == np.float32
    # exactly {0, 1}: 0.99999997 counts as 1
    np.testing.assert_array_equal(pm.data, cube_mask().astype(np.float32))
    assert pm.params == {"sigma_mm": 0.0, "confidence": 1.0}


def test_from_mask_softening_anisotropic_spacing() -> None:
    # spacing (2, 1, 2/3) mm and sigma 2 mm -> sigma (1, 2, 3) voxels.
    spacing = (2.0, 1.0, 2.0 / 3.0)
    sigma_mm = 2.0
    n = 14
    # border across axis 0 (half-space x >= n)
    m0 = np.zeros((2 * n, 3, 3), np.uint8)
    m0[n:] = 1
    p0 = from_mask(m0, sigma_mm=sigma_mm, spacing=spacing).data[:, 1, 1].astype(np.float64)
    # border across axis 2 (half-space z >= n)
    m2 = np.zeros((3, 3, 2 * n), np.uint8)
    m2[..., n:] = 1
    p2 = from_mask(m2, sigma_mm=sigma_mm, spacing=spacing).data[1, 1, :].astype(np.float64)
    for profile, sigma_vox in ((p0, 1.0), (p2, 3.0)):
        # monotone (non-decreasing) across the border, 0..1
        assert np.all(np.diff(profile) >= -1e-7)
        assert profile[0] < 1e-4 and profile[-1] > 1 - 1e-4
        # the border lies between voxels n-1 and n: their values are symmetric about 0.5
        assert profile[n - 1] < 0.5 < profile[n]
        assert profile[n - 1] + profile[n] == pytest.approx(1.0, abs=1e-6)
        # and equal the hand-computed discrete-Gaussian step profile
        np.testing.assert_allclose(profile, gaussian_step_profile(sigma_vox, n), atol=1e-6)
    # sigma 1 voxel: first voxel inside = 0.5 + w(0)/2 with
    # w(0) = 1 / (1 + 2 (e^-0.5 + e^-2 + e^-4.5 + e^-8)) = 1 / 2.50662 = 0.39894 -> 0.69947
    assert p0[n] == pytest.approx(0.69947, abs=1e-4)
    # same physical distance from the border, same value: voxel centres 1 mm inside are
    # p0[n] (0.5 voxel x 2 mm) and p2[n + 1] (1.5 voxel x 2/3 mm); both ~ Phi(1/2) = 0.69
    assert p2[n + 1] == pytest.approx(p0[n], abs=0.01)
    # 3 mm inside: p0[n + 1] and p2[n + 4]; ~ Phi(3/2) = 0.933
    assert p2[n + 4] == pytest.approx(p0[n + 1], abs=0.01)
    # and different voxel distances: the blur is anisotropic in voxels
    assert abs(p2[n] - p0[n]) > 0.1


def test_from_mask_without_spacing_uses_1mm() -> None:
    m = np.zeros((20, 3, 3), np.uint8)
    m[10:] = 1
    p = from_mask(m, sigma_mm=1.0).data[:, 1, 1]
    np.testing.assert_allclose(p, gaussian_step_profile(1.0, 10), atol=1e-6)


def test_from_mask_confidence_label_smoothing_exact() -> None:
    # confidence c: inside -> c, outside -> 1 - c; c = 0.9 -> {0.1, 0.9}, c = 0.75 -> {0.25, 0.75}
    mask = cube_mask()
    for c in (0.9, 0.75):
        pm = from_mask(mask, confidence=c)
        np.testing.assert_allclose(pm.data[mask == 1], c, atol=1e-7)
        np.testing.assert_allclose(pm.data[mask == 0], 1.0 - c, atol=1e-7)
        assert pm.params["confidence"] == c


def test_from_mask_confidence_after_blur() -> None:
    # blur then smoothing: p' = (1 - c) + (2c - 1) p; with c = 0.8, a blurred value p maps
    # to 0.2 + 0.6 p
    m = np.zeros((20, 3, 3), np.uint8)
    m[10:] = 1
    blurred = from_mask(m, sigma_mm=1.0).data
    both = from_mask(m, sigma_mm=1.0, confidence=0.8).data
    np.testing.assert_allclose(both, 0.2 + 0.6 * blurred, atol=1e-6)


@pytest.mark.parametrize("confidence", [0.5, 0.3, 1.01])
def test_from_mask_bad_confidence(confidence: float) -> None:
    with pytest.raises(InvalidPriorError, match="confidence"):
        from_mask(cube_mask(), confidence=confidence)


def test_from_mask_negative_sigma() -> None:
    with pytest.raises(InvalidPriorError, match="sigma_mm"):
        from_mask(cube_mask(), sigma_mm=-1.0)


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0], ids=["soft", "label-2", "negative"])
def test_from_mask_non_binary_is_error(value: float) -> None:
    mask = cube_mask().astype(np.float32)
    mask[3, 3, 3] = value
    with pytest.raises(InvalidPriorError, match="kind='labels'"):
        from_mask(mask)


def test_from_mask_non_binary_value_in_any_slice_is_error() -> None:
    # regression: binarity used to be checked on every (shape[0] // 64)-th slice only, so
    # a soft value in an odd slice of a 128-slice mask was silently thresholded
    mask = np.zeros((128, 4, 4), np.float32)
    mask[10:20, 1:3, 1:3] = 1.0
    mask[21, 1, 1] = 0.3
    with pytest.raises(InvalidPriorError):
        from_mask(mask)


# ------------------------------------------------------------------------------- from_labels


def brats_like_labels() -> np.ndarray:
    lab = np.zeros((8, 8, 8), np.int16)
    lab[1:7, 1:7, 1:7] = 2  # oedema
    lab[2:6, 2:6, 2:6] = 1  # necrosis
    lab[3:5, 3:5, 3:5] = 4  # enhancing
    return lab


def test_from_labels_default_is_every_non_zero_label() -> None:
    lab = brats_like_labels()
    pm = from_labels(lab, AFFINE)
    assert pm.source == "labels"
    np.testing.assert_array_equal(pm.data, (lab > 0).astype(np.float32))
    assert pm.params == {"labels": [1, 2, 4]}


def test_from_labels_chosen_labels() -> None:
    lab = brats_like_labels()
    # tumour core = labels 1 and 4: the 4x4x4 block (64 voxels)
    pm = from_labels(lab.astype(np.float64), labels=[1, 4])
    np.testing.assert_array_equal(pm.data, np.isin(lab, [1, 4]).astype(np.float32))
    assert pm.data.sum() == 64
    assert pm.params == {"labels": [1, 4]}


def test_from_labels_missing_label_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    lab = brats_like_labels()
    with caplog.at_level(logging.WARNING, logger=ADAPTER_LOGGER):
        pm = from_labels(lab, labels=[3, 4])
    assert "[3]" in caplog.text and "not present" in caplog.text
    assert pm.data.sum() == 8  # label 4 only: 2x2x2


def test_from_labels_non_integer_is_error() -> None:
    lab = brats_like_labels().astype(np.float32)
    lab[0, 0, 0] = 0.5
    with pytest.raises(InvalidPriorError, match="integers"):
        from_labels(lab)


# ------------------------------------------------------------------------------- from_logits


def test_from_logits_exact_sigmoid_values() -> None:
    data = np.array([0.0, 2.0, -2.0, 4.0]).reshape(1, 1, 4)
    pm = from_logits(data)
    # sigmoid(0) = 0.5, sigmoid(2) = 0.880797, sigmoid(-2) = 0.119203, sigmoid(4) = 0.982014
    np.testing.assert_allclose(pm.data.ravel(), [0.5, 0.88079708, 0.11920292, 0.98201379], atol=1e-7)
    assert pm.source == "logits"
    # temperature 2: sigmoid(x / 2); sigmoid(1) = 0.731059, sigmoid(-1) = 0.268941, sigmoid(2)
    pm2 = from_logits(data, temperature=2.0)
    np.testing.assert_allclose(pm2.data.ravel(), [0.5, 0.73105858, 0.26894142, 0.88079708], atol=1e-7)
    assert pm2.params == {"temperature": 2.0}


def test_from_logits_extreme_values_no_overflow() -> None:
    data = np.array([100.0, -100.0, 1e4, -1e4]).reshape(2, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow RuntimeWarning would fail the test
        with np.errstate(all="raise"):
            pm = from_logits(data)
    np.testing.assert_array_equal(pm.data.ravel(), [1.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_from_logits_bad_temperature(temperature: float) -> None:
    with pytest.raises(InvalidPriorError, match="temperature"):
        from_logits(np.zeros((2, 2, 2)), temperature=temperature)


# ------------------------------------------------------------------------------- from_scores


def robust_score_map() -> tuple[np.ndarray, np.ndarray, float, float]:
    """64 in-brain scores with median 10 and MAD 2, plus two probe voxels.

    Sorted in-brain values: 30 x 8, 4 x 10, 28 x 12, p50, p90. The 32nd and 33rd values are
    both 10 -> median 10. Absolute deviations: 4 x 0, 58 x 2, 2 large -> MAD 2, so the
    robust scale is 1.4826 * 2 = 2.9652. z = 3 (p = 0.5) at 10 + 3 * 2.9652 = 18.8956;
    z = 4 (p = 0.9 with slope ln 9) at 10 + 4 * 2.9652 = 21.8608.
    """
    scale = 1.4826 * 2.0
    p50, p90 = 10.0 + 3.0 * scale, 10.0 + 4.0 * scale
    inside = np.array([8.0] * 30 + [10.0] * 4 + [12.0] * 28 + [p50, p90])
    scores = np.full((4, 4, 5), 1000.0)  # huge scores outside the brain must give p = 0
    brain = np.zeros((4, 4, 5), bool)
    brain[..., :4] = True
    scores[brain] = inside
    return scores, brain, p50, p90


def test_from_scores_robust_hand_computed() -> None:
    scores, brain, p50, p90 = robust_score_map()
    pm = from_scores(scores, brain_mask=brain, method="robust")
    assert pm.source == "scores"
    assert pm.params["median"] == pytest.approx(10.0)
    assert pm.params["scale"] == pytest.approx(2.9652, rel=1e-6)
    # p = 0.5 exactly at median + 3 * 1.4826 * MAD and p = 0.9 one robust deviation later
    assert pm.data[scores == p50].item() == pytest.approx(0.5, abs=1e-5)
    assert pm.data[scores == p90].item() == pytest.approx(0.9, abs=1e-5)
    # a score of 12: z = 2 / 2.9652 = 0.67449, p = 1 / (1 + 9^2.32551) = 1 / (1 + 165.6) = 0.006002
    expected_12 = 1.0 / (1.0 + 9.0 ** (3.0 - 2.0 / 2.9652))
    np.testing.assert_allclose(pm.data[scores == 12.0], expected_12, rtol=1e-4)
    assert expected_12 == pytest.approx(0.006002, abs=1e-6)
    # outside the brain: 0 whatever the score
    assert np.all(pm.data[~brain] == 0.0)


def test_from_scores_robust_custom_centre_slope() -> None:
    scores, brain, p50, _ = robust_score_map()
    # centre 2: p = 0.5 at z = 2 i.e. 10 + 2 * 2.9652 = 15.9304; the p50 probe (z = 3)
    # then gets sigmoid(slope * 1) = sigmoid(1) = 0.731059 with slope 1
    pm = from_scores(scores, brain_mask=brain, method="robust", centre=2.0, slope=1.0)
    assert pm.data[scores == p50].item() == pytest.approx(0.7310586, abs=1e-5)


def bimodal_scores(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (20, 20, 20)
    high = np.zeros(shape, bool)
    high[5:10, 5:10, 5:15] = True  # 250 of 8000 voxels are anomalous
    scores = rng.normal(0.0, 1.0, shape)
    scores[high] = rng.normal(10.0, 1.0, int(high.sum()))
    return scores, high


def test_from_scores_mixture_separates_modes() -> None:
    scores, high = bimodal_scores()
    pm = from_scores(scores, method="mixture")  # every score non-zero -> all voxels
    assert pm.params["method"] == "mixture"
    assert pm.data[high].min() > 0.9
    assert pm.data[~high].max() < 0.1
    means = pm.params["means"]
    assert means[0] == pytest.approx(0.0, abs=0.2) and means[1] == pytest.approx(10.0, abs=0.3)


def test_from_scores_mixture_zero_outside_brain_mask() -> None:
    scores, high = bimodal_scores(1)
    brain = np.zeros(scores.shape, bool)
    brain[2:18, 2:18, 2:18] = True
    scores[~brain] = 50.0  # very anomalous looking, but outside the brain
    pm = from_scores(scores, brain_mask=brain, method="mixture")
    assert np.all(pm.data[~brain] == 0.0)
    assert pm.data[high & brain].min() > 0.9


def _bulk_plus_tail(seed: int, tail_mean: float) -> tuple[np.ndarray, np.ndarray]:
    """A residual-like map: a half-normal bulk and a 2.7 % tail of lesions (729 voxels)."""
    rng = np.random.default_rng(seed)
    shape = (30, 30, 30)
    lesion = np.zeros(shape, bool)
    lesion[10:19, 10:19, 10:19] = True
    scores = np.abs(rng.normal(0.0, 1.0, shape))
    scores[lesion] = rng.normal(tail_mean, 0.5, int(lesion.sum()))
    return scores, lesion


def test_from_scores_default_is_robust_rule_on_bulk_plus_tail() -> None:
    scores, lesion = _bulk_plus_tail(8, 9.0)
    pm = from_scores(scores)
    assert pm.params["method"] == "robust"
    labelled = pm.data >= 0.5
    # half-normal bulk: median 0.674, robust SD 0.59, p = 0.5 at |x| = 2.45 -> ~1.4 % of it
    assert labelled[lesion].all() and labelled[~lesion].mean() < 0.02


def test_from_scores_mixture_warns_when_upper_component_is_the_bulk(caplog) -> None:
    # a clipped residual: half the voxels in a spike at the floor, the rest a half-normal
    rng = np.random.default_rng(8)
    scores = np.clip(rng.normal(0.0, 1.0, (30, 30, 30)), 0.0, None) + 0.01
    scores[10:19, 10:19, 10:19] = rng.normal(3.0, 0.5, (9, 9, 9))
    with caplog.at_level(logging.WARNING, logger="cgc_refine.priors.adapters"):
        pm = from_scores(scores, method="mixture")
    assert pm.params["weights"][1] > 0.5
    assert "upper component" in caplog.text


def test_from_scores_default_mask_is_non_zero_scores() -> None:
    # without a mask, zero scores (e.g. a residual map outside the brain) define "outside"
    scores, high = bimodal_scores(2)
    outside = np.zeros(scores.shape, bool)
    outside[:, :, 17:] = True
    scores[outside] = 0.0
    pm = from_scores(scores, method="robust")
    assert np.all(pm.data[outside] == 0.0)
    inside = scores[~outside]
    assert pm.params["median"] == pytest.approx(float(np.median(inside.astype(np.float32))), rel=1e-6)


def test_from_scores_constant_is_error() -> None:
    with pytest.raises(InvalidPriorError, match="constant"):
        from_scores(np.full((4, 4, 4), 3.0))
    # constant inside the brain mask even though it varies outside
    scores = np.full((4, 4, 4), 3.0)
    scores[0] = 9.0
    brain = np.zeros((4, 4, 4), bool)
    brain[1:] = True
    with pytest.raises(InvalidPriorError, match="constant"):
        from_scores(scores, brain_mask=brain, method="robust")


def test_from_scores_bad_method_and_mask_shape() -> None:
    scores, _ = bimodal_scores()
    with pytest.raises(InvalidPriorError, match="method"):
        from_scores(scores, method="zscore")
    with pytest.raises(InvalidPriorError, match="shape"):
        from_scores(scores, brain_mask=np.ones((2, 2, 2), bool))


# -------------------------------------------------------------------------- infer_prior_kind


def test_infer_prior_kind_rules() -> None:
    rng = np.random.default_rng(3)
    mask = cube_mask()
    assert infer_prior_kind(mask) == "mask"
    assert infer_prior_kind(mask.astype(bool)) == "mask"
    assert infer_prior_kind(mask.astype(np.float32)) == "mask"
    assert infer_prior_kind(brats_like_labels()) == "labels"
    assert infer_prior_kind(brats_like_labels().astype(np.float32)) == "labels"
    assert infer_prior_kind(rng.uniform(0, 1, (6, 6, 6))) == "probability"
    # logits: most voxels confidently background (median -8 < -2), a few positive
    logits = np.full((6, 6, 6), -8.0) + rng.normal(0, 0.5, (6, 6, 6))
    logits[2:4, 2:4, 2:4] = 6.0
    assert infer_prior_kind(logits) == "logits"
    # z-score-like anomaly scores: median ~0, values outside [0, 1]
    assert infer_prior_kind(rng.normal(0, 1, (6, 6, 6))) == "scores"
    # non-negative integers with too many distinct values are not labels
    assert infer_prior_kind(np.arange(512).reshape(8, 8, 8)) == "scores"


def test_infer_prior_kind_non_finite() -> None:
    data = np.zeros((3, 3, 3))
    data[0, 0, 0] = np.nan
    with pytest.raises(InvalidPriorError, match="NaN"):
        infer_prior_kind(data)


# ------------------------------------------------------------------------- as_probability_map


def test_as_probability_map_dispatches_each_kind() -> None:
    rng = np.random.default_rng(4)
    prob = rng.uniform(0, 1, (6, 6, 6))
    pm = as_probability_map(prob, AFFINE, kind="probability")
    assert pm.source == "probability"
    np.testing.assert_array_equal(pm.affine, AFFINE)

    m = np.zeros((20, 3, 3), np.uint8)
    m[10:] = 1
    pm = as_probability_map(m, kind="mask", sigma_mm=2.0, spacing=(2.0, 1.0, 1.0))
    assert pm.source == "mask"
    # spacing is passed through: sigma 2 mm / 2 mm = 1 voxel
    np.testing.assert_allclose(pm.data[:, 1, 1], gaussian_step_profile(1.0, 10), atol=1e-6)

    pm = as_probability_map(brats_like_labels(), kind="labels", labels=[4])
    assert pm.source == "labels" and pm.data.sum() == 8

    pm = as_probability_map(np.zeros((2, 2, 2)), kind="logits", temperature=3.0)
    assert pm.source == "logits" and np.all(pm.data == 0.5)

    scores, brain, p50, _ = robust_score_map()
    pm = as_probability_map(scores, kind="scores", brain_mask=brain, method="robust")
    assert pm.source == "scores"
    assert pm.data[scores == p50].item() == pytest.approx(0.5, abs=1e-5)
    assert np.all(pm.data[~brain] == 0.0)  # brain_mask reached the scores adapter


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: cube_mask(), "mask"),
        (lambda: brats_like_labels(), "labels"),
        (lambda: np.random.default_rng(5).uniform(0, 1, (6, 6, 6)), "probability"),
        (lambda: np.where(cube_mask(lo=3, hi=5) > 0, 5.0, -9.0), "logits"),
        (lambda: bimodal_scores()[0], "scores"),
    ],
    ids=["mask", "labels", "probability", "logits", "scores"],
)
def test_as_probability_map_auto_logs_inferred_kind(
    make, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=ADAPTER_LOGGER):
        pm = as_probability_map(make())
    assert pm.source == expected
    assert f"prior kind inferred from its values: {expected}" in caplog.text


def test_as_probability_map_returns_probability_map_unchanged() -> None:
    pm = ProbabilityMap(np.full((3, 3, 3), 0.25, np.float32), AFFINE, "gmm", {"K": 4})
    assert as_probability_map(pm) is pm
    assert as_probability_map(pm, kind="logits") is pm


def test_as_probability_map_unknown_kind() -> None:
    with pytest.raises(InvalidPriorError, match="unknown prior kind 'heatmap'"):
        as_probability_map(np.zeros((2, 2, 2)), kind="heatmap")
    # issue 13 item 2 added the scaled probability storages "percent" and "probability-255"
    assert set(ADAPTER_KINDS) == {"probability", "percent", "probability-255", "mask", "labels",
                                  "logits", "scores"}


# ---------------------------------------------------------------------- check_prior_informative


def test_check_prior_informative() -> None:
    brain = np.zeros((6, 6, 6), bool)
    brain[1:5, 1:5, 1:5] = True
    good = np.zeros((6, 6, 6), np.float32)
    good[2:4, 2:4, 2:4] = 0.9
    assert check_prior_informative(ProbabilityMap(good)) is None
    assert check_prior_informative(ProbabilityMap(good), brain) is None

    empty = np.full((6, 6, 6), 0.49, np.float32)  # nothing reaches 0.5
    with pytest.raises(InvalidPriorError, match="empty"):
        check_prior_informative(ProbabilityMap(empty))

    full = np.full((6, 6, 6), 0.5, np.float32)  # everything reaches 0.5
    with pytest.raises(InvalidPriorError, match="every brain voxel"):
        check_prior_informative(ProbabilityMap(full))

    # full inside the brain, 0 outside: fine over the whole grid, refused with the mask
    inside_only = np.where(brain, 1.0, 0.0).astype(np.float32)
    assert check_prior_informative(ProbabilityMap(inside_only)) is None
    with pytest.raises(InvalidPriorError, match="every brain voxel"):
        check_prior_informative(ProbabilityMap(inside_only), brain)
    # lesion entirely outside the brain mask: empty inside the brain
    outside_only = np.where(brain, 0.0, 1.0).astype(np.float32)
    with pytest.raises(InvalidPriorError, match="empty"):
        check_prior_informative(ProbabilityMap(outside_only), brain)


# ------------------------------------------- issue 13 item 2: common encodings of a prior file


def soft_blob(shape=(24, 24, 12)) -> np.ndarray:
    """A smooth probability map that reaches 1: a blurred box, scaled to maximum 1."""
    from scipy import ndimage

    box = np.zeros(shape)
    box[8:16, 8:16, 4:8] = 1.0
    blob = ndimage.gaussian_filter(box, 1.5)
    return blob / blob.max()


def test_uint8_probability_is_read_as_255_scaled_not_as_labels(caplog) -> None:
    p = soft_blob()
    stored = np.round(p * 255).astype(np.uint8)
    assert len(np.unique(stored)) > 16  # the case: read before as a label map
    assert infer_prior_kind(stored) == "probability-255"
    with caplog.at_level(logging.WARNING, logger=ADAPTER_LOGGER):
        pm = as_probability_map(stored)
    assert pm.source == "probability" and pm.params["scale"] == 255.0
    assert pm.params["kind_inferred"] == "probability-255"
    np.testing.assert_allclose(pm.data, p, atol=0.5 / 255 + 1e-6)
    # the lesion is the blob's core, not the whole non-zero support
    assert int((pm.data >= 0.5).sum()) == int((p >= 0.5).sum())
    assert "prior kind inferred from its values: probability-255" in caplog.text  # a WARNING


@pytest.mark.parametrize("integer", [False, True], ids=["float", "integer"])
def test_percent_probability_is_divided_by_100(integer: bool, caplog) -> None:
    p = soft_blob()
    stored = np.round(p * 100) if integer else p * 100.0
    with caplog.at_level(logging.WARNING, logger=ADAPTER_LOGGER):
        pm = as_probability_map(stored.astype(np.float32))
    assert pm.params["kind_inferred"] == "percent" and pm.params["scale"] == 100.0
    np.testing.assert_allclose(pm.data, p, atol=0.005 + 1e-6)
    assert "inferred from its values: percent" in caplog.text


def test_float_0_255_probability_is_divided_by_255() -> None:
    p = soft_blob()
    pm = as_probability_map((p * 255.0).astype(np.float32))
    assert pm.params["kind_inferred"] == "probability-255"
    np.testing.assert_allclose(pm.data, p, atol=1e-5)


def test_tiny_excursions_of_a_probability_map_are_clipped_and_said(caplog) -> None:
    p = soft_blob()
    wobbly = p + np.where(p < 0.5, -1e-6, 1e-6)  # -1e-6 .. 1 + 1e-6 (a resampler's overshoot)
    assert wobbly.min() < 0 and wobbly.max() > 1
    with caplog.at_level(logging.WARNING, logger=ADAPTER_LOGGER):
        pm = as_probability_map(wobbly)
    assert pm.params["kind_inferred"] == "probability"
    assert pm.data.min() == 0.0 and pm.data.max() == 1.0
    np.testing.assert_allclose(pm.data, p, atol=2e-6)
    assert "inferred from its values: probability" in caplog.text
    assert "clipped" in caplog.text


def test_minus_one_to_one_map_is_refused_naming_prior_kind() -> None:
    with pytest.raises(InvalidPriorError, match=r"\[-1, 1\].*--prior-kind"):
        as_probability_map(2.0 * soft_blob() - 1.0)


@pytest.mark.parametrize(
    "make",
    [
        # floats with a maximum of 120: neither percent nor a 0-255 map that reaches 0.5
        lambda: soft_blob() * 120.0,
        # dense integers up to 40: a percent map that never reaches 50 %, or what else?
        lambda: np.round(soft_blob() * 40.0).astype(np.int16),
        # 31 integer values up to 120: too many labels, neither percent nor 0-255
        lambda: np.resize(np.arange(0, 121, 4), (8, 8, 8)).astype(np.uint8),
    ],
    ids=["float-0-120", "integers-0-40", "integers-0-120"],
)
def test_ambiguous_encodings_are_refused(make) -> None:
    with pytest.raises(InvalidPriorError, match="--prior-kind"):
        as_probability_map(make())


def test_plain_readings_are_info_and_recorded(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=ADAPTER_LOGGER):
        pm = as_probability_map(soft_blob())
        mask = as_probability_map(cube_mask())
    assert caplog.text == ""  # exactly {0, 1} and within [0, 1]: nothing to warn about
    assert pm.params["kind_inferred"] == "probability" and mask.params["kind_inferred"] == "mask"
    with caplog.at_level(logging.WARNING, logger=ADAPTER_LOGGER):
        labels = as_probability_map(brats_like_labels())
    assert labels.params["kind_inferred"] == "labels"
    assert "inferred from its values: labels" in caplog.text  # labels are said at WARNING


def test_explicit_scaled_kinds_and_their_range_check() -> None:
    stored = np.round(soft_blob() * 255)
    assert as_probability_map(stored, kind="probability-255").params["scale"] == 255.0
    assert "kind_inferred" not in as_probability_map(stored, kind="probability-255").params
    with pytest.raises(InvalidPriorError, match="after dividing by 100"):
        as_probability_map(stored, kind="percent")
    with pytest.raises(InvalidPriorError, match="kind='probability-255'"):
        from_probability(stored)
    with pytest.raises(InvalidPriorError, match="scale must be positive"):
        from_probability(soft_blob(), scale=0.0)


def test_file_prior_uint8_with_resampling_is_decided_before_interpolation(tmp_path) -> None:
    import nibabel as nib

    from cgc_refine.io import load_volume
    from cgc_refine.priors.adapters import FilePrior

    p = soft_blob()
    image_path = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image((p * 100 + 10).astype(np.float32), np.eye(4)), str(image_path))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5  # half a voxel: linear interpolation makes non-integers of the bytes
    prior_path = tmp_path / "prior.nii.gz"
    nib.save(nib.Nifti1Image(np.round(p * 255).astype(np.uint8), shifted), str(prior_path))
    volume = load_volume(image_path)
    pm = FilePrior(prior_path, resample=True).compute(volume)
    assert pm.params["kind_inferred"] == "probability-255"
    assert pm.params["file"]["resampled"] is True
    assert 0.0 <= pm.data.min() and pm.data.max() <= 1.0 and pm.data.max() > 0.9
