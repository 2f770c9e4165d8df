"""Bias-field correction, mode standardisation, the outlier prior, the GMM foreground rule and
the registry of built-in priors (issue 12), on synthetic volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from cgc_refine.brain import estimate_bias_field, robust_normalise, tissue_mode_scale
from cgc_refine.exceptions import InvalidPriorError
from cgc_refine.io import Volume
from cgc_refine.priors import (
    AUTO_PRIOR,
    BUILTIN_PRIORS,
    GMMPrior,
    MumfordShahPrior,
    OutlierPrior,
    make_prior,
    prepare_prior_input,
)

SHAPE = (64, 64, 40)
#: 4 mm voxels: the ball below is then brain-sized (~150 mm across), as bias fields are
#: smooth relative to a real head.
SPACING = (4.0, 4.0, 4.0)


def ball(shape, centre, radius):  # noqa: ANN001, ANN201
    grid = np.indices(shape, dtype=np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def known_field(shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth multiplicative field, ~1.6x from one side of the brain to the other."""
    x, y, z = (np.indices(shape, dtype=np.float64) / np.asarray(shape, float)[:, None, None, None]) - 0.5
    return np.exp(1.2 * x - 0.8 * y + 1.5 * (x**2 + z**2) + 0.6 * z)


def phantom(seed: int = 0, *, with_field: bool = True, lesion: bool = True):  # noqa: ANN201
    """Raw-like FLAIR: WM 100 (noise sd 8), a GM shell 106, CSF core 40, and a lesion tail."""
    rng = np.random.default_rng(seed)
    brain = ball(SHAPE, (31.5, 31.5, 19.5), 18.5)
    inner = ball(SHAPE, (31.5, 31.5, 19.5), 15.5)
    csf = ball(SHAPE, (31.5, 31.5, 19.5), 3.0)
    truth = ball(SHAPE, (40.0, 24.0, 20.0), 5.0) if lesion else np.zeros(SHAPE, bool)
    clean = np.zeros(SHAPE)
    clean[brain] = 106.0
    clean[inner] = 100.0
    clean[csf] = 40.0
    # the lesion: a tail 5-9 noise SD above white matter
    clean[truth] = 100.0 + rng.uniform(40.0, 72.0, int(truth.sum()))
    image = clean + rng.normal(0.0, 8.0, SHAPE)
    field = known_field(SHAPE) if with_field else np.ones(SHAPE)
    image = np.where(brain, image * field, 0.0).astype(np.float32)
    return Volume.from_array(image, spacing=SPACING), brain, truth, field


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


# ----------------------------------------------------------------------------- bias field


def test_bias_field_recovers_known_field_up_to_a_constant() -> None:
    volume, brain, _, field = phantom()
    estimate, info = estimate_bias_field(volume.data[0], brain, SPACING)
    assert info["applied"] is True and estimate is not None
    error = np.log(estimate[brain]) - np.log(field[brain])
    error -= error.mean()  # up to a constant
    truth_spread = np.log(field[brain]).std()
    # the field spans about 2x across the brain; the estimate is within ~5 % nearly everywhere
    assert truth_spread > 0.15
    assert np.percentile(np.abs(error), 95) < 0.05
    assert np.abs(error).mean() < 0.15 * truth_spread
    assert 1.7 < info["ratio_95_5"] < 2.5


def test_bias_correction_sharpens_the_tissue_peak() -> None:
    volume, brain, _, _ = phantom()
    before = tissue_mode_scale(volume.data[0][brain])
    prepared = prepare_prior_input(volume, brain, standardise="mode", bias_correction=True)
    corrected = prepared.standardisation
    assert corrected["bias_field"][0]["applied"] is True
    # the relative width of the white-matter peak shrinks toward its noise (8 / 100)
    assert before[1] / before[0] > 0.13
    assert corrected["scale"][0] / corrected["centre"][0] < 0.10


def test_bias_field_skipped_for_standardised_images() -> None:
    volume, brain, _, _ = phantom(with_field=False)
    z = robust_normalise(volume.data, brain)  # negative values: a z-scored image
    estimate, info = estimate_bias_field(z[0], brain, SPACING)
    assert estimate is None and info["applied"] is False
    prepared = prepare_prior_input(z, brain, bias_correction=True)
    assert prepared.standardisation["bias_field"][0]["applied"] is False


def test_no_field_estimates_a_flat_field() -> None:
    volume, brain, _, _ = phantom(with_field=False)
    estimate, _ = estimate_bias_field(volume.data[0], brain, SPACING)
    # within 5 % (the known field of the other tests spans +-40 %)
    assert np.percentile(np.abs(np.log(estimate[brain])), 95) < 0.05


# ----------------------------------------------------------------------------- mode standardisation


def test_tissue_mode_scale_ignores_the_upper_tail() -> None:
    rng = np.random.default_rng(3)
    tissue = rng.normal(100.0, 5.0, 200_000)
    tail = rng.uniform(120.0, 200.0, 30_000)  # 13 % lesion: widens the MAD, not the lower side
    mode, scale = tissue_mode_scale(np.concatenate([tissue, tail]))
    assert mode == pytest.approx(100.0, abs=1.5)
    assert scale == pytest.approx(5.0, rel=0.1)
    values = np.concatenate([tissue, tail])
    mad_scale = 1.4826 * np.median(np.abs(values - np.median(values)))
    assert mad_scale > 5.8  # the MAD is widened by the tail; the lower half-width is not


def test_robust_normalise_mode_method() -> None:
    volume, brain, _, _ = phantom(with_field=False, lesion=False)
    out, centres, scales = robust_normalise(volume.data, brain, method="mode", return_params=True)
    # white matter (100) and grey matter (106) merge into one peak between them
    assert 99.0 < centres[0] < 106.0
    assert 7.0 < scales[0] < 10.5
    assert np.median(out[0][brain]) == pytest.approx(0.0, abs=1.0)


# ----------------------------------------------------------------------------- outlier prior


def test_outlier_prior_finds_the_lesion_tail_under_a_bias_field() -> None:
    volume, brain, truth, _ = phantom()
    pmap = OutlierPrior().compute(volume, brain)
    assert pmap.source == "outlier"
    hard = pmap.data >= 0.5
    assert dice(hard, truth) > 0.85
    assert pmap.params["standardisation"]["bias_field"][0]["applied"] is True
    assert 0.0 <= pmap.data.min() and pmap.data.max() <= 1.0
    assert not pmap.data[~brain].any()


def test_outlier_prior_without_lesion_marks_almost_nothing() -> None:
    volume, brain, _, _ = phantom(lesion=False)
    pmap = OutlierPrior().compute(volume, brain)
    assert (pmap.data >= 0.5).sum() < 0.01 * brain.sum()


def test_outlier_strictness_orders_the_marked_volume() -> None:
    volume, brain, _, _ = phantom()
    sizes = [int((OutlierPrior(s).compute(volume, brain).data >= 0.5).sum()) for s in (2.0, 3.0, 6.0)]
    assert sizes[0] >= sizes[1] > sizes[2]


def test_outlier_drops_specks() -> None:
    volume, brain, truth, _ = phantom(lesion=False)
    data = volume.data.copy()
    data[0, 31, 45, 20] *= 3.0  # one bright white-matter voxel: 8 mm^3 at 2 mm, below 10 mm^3
    fine = Volume.from_array(data, spacing=(2.0, 2.0, 2.0))
    pmap = OutlierPrior(smoothing_mm=0.0).compute(fine, brain)
    assert pmap.data[31, 45, 20] == 0.0
    kept = OutlierPrior(smoothing_mm=0.0, min_size_mm3=0.0).compute(fine, brain)
    assert kept.data[31, 45, 20] >= 0.5


def test_outlier_prior_rejects_bad_settings() -> None:
    volume, brain, _, _ = phantom()
    with pytest.raises(InvalidPriorError, match="modality"):
        OutlierPrior(modality="ct").compute(volume, brain)
    with pytest.raises(InvalidPriorError, match="smoothing_mm"):
        OutlierPrior(smoothing_mm=-1.0).compute(volume, brain)


# ----------------------------------------------------------------------------- GMM rule


def test_gmm_plausible_rule_keeps_a_real_lesion_class() -> None:
    volume, brain, truth, _ = phantom(with_field=False)
    pmap = GMMPrior().compute(volume, brain)
    decision = pmap.params["foreground_decision"]
    assert decision["fallback"] is False
    assert decision["top_separation_sd"] > 2.0


def test_gmm_plausible_rule_falls_back_without_a_lesion_class() -> None:
    # no lesion: the brightest of four components is normal tissue (grey matter)
    volume, brain, _, _ = phantom(with_field=False, lesion=False)
    brightest = GMMPrior(foreground_rule="brightest").compute(volume, brain)
    plausible = GMMPrior().compute(volume, brain)
    assert brightest.params["foreground_decision"]["fallback"] is False
    assert (brightest.data >= 0.5).sum() > 0.05 * brain.sum()  # grey matter taken as lesion
    assert plausible.params["foreground_decision"]["fallback"] is True
    assert (plausible.data >= 0.5).sum() < 0.01 * brain.sum()


def test_gmm_rule_validation() -> None:
    volume, brain, _, _ = phantom()
    with pytest.raises(InvalidPriorError, match="foreground_rule"):
        GMMPrior(foreground_rule="largest").compute(volume, brain)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_auto() -> None:
    assert BUILTIN_PRIORS[0] == "auto"
    assert {"gmm", "gmm-brightest", "mumford-shah", "mumford-shah-bias", "outlier"} <= set(BUILTIN_PRIORS)
    assert AUTO_PRIOR in BUILTIN_PRIORS and AUTO_PRIOR != "auto"
    assert type(make_prior("auto")) is type(make_prior(AUTO_PRIOR))
    # the outlier prior models MRI only: for CT "auto" names the GMM on the brain window
    assert isinstance(make_prior("auto", modality="ct"), GMMPrior)
    assert make_prior("auto", modality="ct").modality == "ct"
    assert isinstance(make_prior("outlier", strictness=4.0, device="cpu"), OutlierPrior)
    assert make_prior("outlier", strictness=4.0).strictness == 4.0
    assert make_prior("gmm-brightest").foreground_rule == "brightest"
    assert make_prior("mumford-shah-bias").bias_correction is True
    assert isinstance(make_prior("mumford-shah", device="cpu"), MumfordShahPrior)
    with pytest.raises(InvalidPriorError, match="outlier"):
        make_prior("nonsense")


def test_refiner_accepts_every_builtin_name() -> None:
    from cgc_refine.refiner import Refiner

    for name in BUILTIN_PRIORS:
        assert hasattr(Refiner(name)._builtin_prior(), "compute")
    with pytest.raises(InvalidPriorError, match="auto"):
        Refiner("nonsense")._builtin_prior()


def test_outlier_prior_uses_the_bright_channel_of_several() -> None:
    volume, brain, truth, _ = phantom()
    flat = np.where(brain, 100.0, 0.0).astype(np.float32)  # a featureless second channel
    stacked = Volume.from_array(np.stack([flat, volume.data[0]]), spacing=SPACING)
    pmap = OutlierPrior(bright_channel=1).compute(stacked, brain)
    assert dice(pmap.data >= 0.5, truth) > 0.85
    # a bare array is read at 1 mm: use the phantom without a field (at 1 mm the ball is a
    # 4 cm brain, too small for a 40 mm-smooth field to be told from anatomy)
    unbiased, _, truth_plain, _ = phantom(with_field=False)
    plain = OutlierPrior().compute(unbiased.data[0], brain)
    assert dice(plain.data >= 0.5, truth_plain) > 0.85
    with pytest.raises(InvalidPriorError, match="bright_channel"):
        OutlierPrior(bright_channel=2).compute(stacked, brain)
