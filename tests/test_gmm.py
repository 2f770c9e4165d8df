"""Tests of cgc_refine.priors.gmm: histogram EM (paper section 3.2) and the GMM prior.

The central claim checked here is exactness: EM on ``(bin centre, count)`` pairs equals
scikit-learn's EM on the binned voxels ``centres[index]`` started from the same parameters.
All data are synthetic.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.mixture import GaussianMixture

from cgc_refine.exceptions import InvalidImageError, InvalidPriorError
from cgc_refine.priors.base import ProbabilityMap
from cgc_refine.priors.gmm import (
    GMMPrior,
    HistogramGMM,
    fit_histogram_gmm,
    intensity_histogram,
    kmeans_initialisation,
    select_n_components_bic,
)


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def mixture_samples(weights, means, sds, n, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    comp = rng.choice(len(weights), size=n, p=weights)
    return rng.normal(np.asarray(means)[comp], np.asarray(sds)[comp])


def sklearn_em(X: np.ndarray, weights, means, variances, max_iter: int, tol: float) -> GaussianMixture:
    k = len(means)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning when tol=0 runs out max_iter
        return GaussianMixture(
            k,
            covariance_type="full",
            tol=tol,
            max_iter=max_iter,
            weights_init=np.asarray(weights, float),
            means_init=np.asarray(means, float).reshape(k, 1),
            precisions_init=(1.0 / np.asarray(variances, float)).reshape(k, 1, 1),
        ).fit(X)


# ------------------------------------------------------------------------- intensity_histogram


def test_histogram_integer_data_unit_bins_exact_counts() -> None:
    x = np.array([7, 3, 5, 3, 7, 7], dtype=np.int16)
    centres, counts, index = intensity_histogram(x, return_index=True)
    # one bin per integer, empty bins (4, 6) dropped
    np.testing.assert_array_equal(centres, [3.0, 5.0, 7.0])
    np.testing.assert_array_equal(counts, [2.0, 1.0, 3.0])
    assert centres.dtype == np.float64 and counts.dtype == np.float64
    np.testing.assert_array_equal(centres[index], x)  # exact: binning changes nothing
    # integer-valued floats (a NIfTI stored as float) are treated the same way
    c2, n2 = intensity_histogram(x.astype(np.float32))
    np.testing.assert_array_equal(c2, centres)
    np.testing.assert_array_equal(n2, counts)


def test_histogram_hu_range_gets_unit_bins() -> None:
    # CT in HU: -1024..3071 spans 4095 <= 4 * 1024 values -> one bin per HU
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3072, size=5000).astype(np.int16)
    hu[:2] = (-1024, 3071)
    centres, counts, index = intensity_histogram(hu, 1024, return_index=True)
    assert counts.sum() == 5000
    np.testing.assert_array_equal(centres[index], hu.astype(np.float64))
    assert np.all(np.diff(centres) >= 1.0) and np.all(centres == np.round(centres))


def test_histogram_float_data_equal_bins() -> None:
    # low 0.5, high 4.5, 4 bins of width 1: [0.5, 1.5) [1.5, 2.5) [2.5, 3.5) [3.5, 4.5]
    # centres 1, 2, 3, 4; values -> bins 0, 0, 1, 1, 3 (4.5 is the top edge -> last bin)
    x = np.array([0.5, 1.0, 1.5, 2.4, 4.5])
    centres, counts, index = intensity_histogram(x, 4, return_index=True)
    np.testing.assert_allclose(centres, [1.0, 2.0, 4.0])  # empty bin (3.0) dropped
    np.testing.assert_array_equal(counts, [2.0, 2.0, 1.0])
    np.testing.assert_array_equal(index, [0, 0, 1, 1, 2])


def test_histogram_float_return_index_binned_values() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (30, 20, 10)).astype(np.float32)  # any shape, flattened
    n_bins = 64
    centres, counts, index = intensity_histogram(x, n_bins, return_index=True)
    width = (float(x.max()) - float(x.min())) / n_bins
    assert len(centres) <= n_bins and counts.sum() == x.size
    assert index.shape == (x.size,)
    # centres are on the equal-width grid low + (j + 0.5) width
    j = (centres - float(x.min())) / width - 0.5
    np.testing.assert_allclose(j, np.round(j), atol=1e-6)
    # every value lies in the bin whose centre index points to
    assert np.max(np.abs(x.ravel() - centres[index])) <= width / 2 * (1 + 1e-5)
    # and the counts are the number of values mapped to each bin
    np.testing.assert_array_equal(np.bincount(index), counts)


def test_histogram_wide_integer_range_uses_equal_bins() -> None:
    # range 100 > 4 * 16 -> 16 equal bins of width 6.25: centres 3.125 and 96.875
    centres, counts = intensity_histogram(np.array([0, 100, 100]), 16)
    np.testing.assert_allclose(centres, [3.125, 96.875])
    np.testing.assert_array_equal(counts, [1.0, 2.0])


def test_histogram_constant_or_empty_is_error() -> None:
    with pytest.raises(InvalidImageError, match="constant"):
        intensity_histogram(np.full(100, 3.5))
    with pytest.raises(InvalidImageError, match="no voxel"):
        intensity_histogram(np.array([]))


def test_histogram_int8_wide_range() -> None:
    # regression: (x - offset) used to be computed in int8 and wrapped around
    # (100 - (-100) -> -56), making np.bincount fail; int8 spanning 200 values -> unit bins
    x = np.array([-100, 0, 100], dtype=np.int8)
    centres, counts = intensity_histogram(x, 1024)
    np.testing.assert_array_equal(centres, [-100.0, 0.0, 100.0])
    np.testing.assert_array_equal(counts, [1.0, 1.0, 1.0])


# ------------------------------------------------------------------------- kmeans_initialisation


def test_kmeans_initialisation_hand_computed() -> None:
    # centres 0, 1, 10, 11 with one voxel each, K = 2. Start at the weighted quantiles 0.25
    # and 0.75 of the cumulative [0.25, 0.5, 0.75, 1] -> means 0 and 10; cut 5 -> clusters
    # {0, 1} and {10, 11} -> means 0.5 and 10.5 (stable). Weights 0.5 each; variances
    # ((0.5^2 + 0.5^2) / 2) + reg = 0.25 + 1e-6.
    weights, means, variances = kmeans_initialisation(np.array([0.0, 1.0, 10.0, 11.0]), np.ones(4), 2)
    np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(means, [0.5, 10.5], atol=1e-12)
    np.testing.assert_allclose(variances, [0.25 + 1e-6, 0.25 + 1e-6], atol=1e-12)


def test_kmeans_initialisation_deterministic_and_sensible() -> None:
    x = mixture_samples([0.5, 0.3, 0.2], [0.0, 6.0, 12.0], [1.0, 1.0, 1.0], 20000, seed=2)
    centres, counts = intensity_histogram(x, 512)
    first = kmeans_initialisation(centres, counts, 3)
    second = kmeans_initialisation(centres.copy(), counts.copy(), 3)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)  # bit-identical: no random restarts
    weights, means, variances = first
    assert weights.sum() == pytest.approx(1.0)
    assert np.all(np.diff(means) > 0)
    np.testing.assert_allclose(means, [0.0, 6.0, 12.0], atol=0.3)
    np.testing.assert_allclose(weights, [0.5, 0.3, 0.2], atol=0.03)
    assert np.all(variances > 0)


# ---------------------------------------------------------------------------- fit_histogram_gmm


@pytest.mark.parametrize(
    ("weights", "means", "sds"),
    [
        ([0.7, 0.3], [0.0, 5.0], [1.0, 0.7]),
        ([0.5, 0.3, 0.2], [0.0, 5.0, 10.0], [1.0, 1.0, 1.5]),
    ],
    ids=["K2", "K3"],
)
def test_fit_histogram_gmm_recovers_known_mixture(weights, means, sds) -> None:
    x = mixture_samples(weights, means, sds, 100_000, seed=3)
    centres, counts = intensity_histogram(x, 1024)
    model = fit_histogram_gmm(centres, counts, len(means), tol=1e-8, max_iter=500)
    assert isinstance(model, HistogramGMM)
    assert model.converged and model.n_samples == 100_000 and model.n_components == len(means)
    np.testing.assert_allclose(model.weights, weights, atol=0.01)
    np.testing.assert_allclose(model.means, means, atol=0.05)
    np.testing.assert_allclose(model.variances, np.square(sds), rtol=0.05)
    assert model.weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 3])
def test_histogram_em_equals_sklearn_on_binned_voxels(k: int) -> None:
    """The exactness claim: same start, same iterations -> same fit as sklearn."""
    x = mixture_samples([0.5, 0.3, 0.2], [0.0, 5.0, 10.0], [1.0, 1.0, 1.5], 20_000, seed=4)
    centres, counts, index = intensity_histogram(x, 256, return_index=True)
    binned = centres[index].reshape(-1, 1)
    w0 = np.full(k, 1.0 / k)
    m0 = np.linspace(-1.0, 12.0, k)  # deliberately off the true means
    v0 = np.full(k, 4.0)
    max_iter = 15
    ours = fit_histogram_gmm(
        centres, counts, k, max_iter=max_iter, tol=0.0,
        weights_init=w0, means_init=m0, variances_init=v0,
    )
    ref = sklearn_em(binned, w0, m0, v0, max_iter=max_iter, tol=0.0)
    assert ours.n_iter == ref.n_iter_ == max_iter
    assert not ours.converged
    order = np.argsort(ref.means_.ravel())
    assert ours.log_likelihood == pytest.approx(ref.score(binned), rel=1e-6)
    np.testing.assert_allclose(ours.means, ref.means_.ravel()[order], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.variances, ref.covariances_.ravel()[order], rtol=1e-6)
    np.testing.assert_allclose(ours.weights, ref.weights_[order], rtol=1e-6)
    # the posterior (equation 5) matches sklearn's predict_proba as well
    np.testing.assert_allclose(
        ours.posterior(centres), ref.predict_proba(centres.reshape(-1, 1))[:, order], atol=1e-7
    )


def test_histogram_em_on_integer_data_equals_sklearn_on_raw_voxels() -> None:
    # integer images get unit bins, so histogram EM is exact for the *raw* voxels
    rng = np.random.default_rng(5)
    x = np.round(mixture_samples([0.6, 0.4], [100.0, 160.0], [10.0, 12.0], 10_000, seed=5))
    x = x.astype(np.int16)
    rng.shuffle(x)
    centres, counts = intensity_histogram(x)
    w0, m0, v0 = [0.5, 0.5], [90.0, 150.0], [200.0, 200.0]
    ours = fit_histogram_gmm(centres, counts, 2, max_iter=10, tol=0.0,
                             weights_init=w0, means_init=m0, variances_init=v0)
    raw = x.astype(np.float64).reshape(-1, 1)
    ref = sklearn_em(raw, w0, m0, v0, max_iter=10, tol=0.0)
    assert ours.log_likelihood == pytest.approx(ref.score(raw), rel=1e-6)
    np.testing.assert_allclose(ours.means, np.sort(ref.means_.ravel()), rtol=1e-6)


def test_histogram_em_stops_at_same_iteration_as_sklearn() -> None:
    # with a positive tol both stop when the mean log-likelihood gain drops below tol
    x = mixture_samples([0.5, 0.5], [0.0, 3.0], [1.0, 1.0], 20_000, seed=6)
    centres, counts, index = intensity_histogram(x, 256, return_index=True)
    binned = centres[index].reshape(-1, 1)
    w0, m0, v0 = [0.5, 0.5], [-2.0, 5.0], [1.0, 1.0]
    ours = fit_histogram_gmm(centres, counts, 2, max_iter=500, tol=1e-5,
                             weights_init=w0, means_init=m0, variances_init=v0)
    ref = sklearn_em(binned, w0, m0, v0, max_iter=500, tol=1e-5)
    assert ours.converged and ref.converged_
    assert 2 < ours.n_iter < 500
    assert ours.n_iter == ref.n_iter_
    assert ours.log_likelihood == pytest.approx(ref.score(binned), rel=1e-6)


def test_histogram_gmm_posterior_and_bic() -> None:
    model = HistogramGMM(
        weights=np.array([0.5, 0.5]), means=np.array([0.0, 4.0]), variances=np.array([1.0, 1.0]),
        log_likelihood=-2.0, n_iter=3, converged=True, n_samples=100,
    )
    post = model.posterior(np.array([2.0, 0.0, 100.0]))
    # equal weights and variances: midpoint 2 -> 0.5 / 0.5; at 0 the ratio is e^(-8) :
    # p1 = 1 / (1 + e^8) = 3.3535e-4; far right -> component 1 without overflow
    np.testing.assert_allclose(post[0], [0.5, 0.5])
    assert post[1, 1] == pytest.approx(1.0 / (1.0 + np.exp(8.0)), rel=1e-9)
    np.testing.assert_allclose(post[2], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    # BIC = -2 LL n + (3K - 1) ln n = -2 (-2) 100 + 5 ln 100 = 400 + 23.0259
    assert model.bic() == pytest.approx(400.0 + 5.0 * np.log(100.0))


def test_bic_selects_three_components() -> None:
    x = mixture_samples([0.4, 0.35, 0.25], [0.0, 6.0, 12.0], [1.0, 1.0, 1.0], 30_000, seed=7)
    centres, counts = intensity_histogram(x, 1024)
    best, scores = select_n_components_bic(centres, counts, (2, 3, 4, 5), tol=1e-6, max_iter=300)
    assert best == 3
    assert set(scores) == {2, 3, 4, 5}
    assert scores[3] == min(scores.values())
    assert scores[2] - scores[3] > 1000  # K = 2 is far worse on clearly 3-modal data


# ------------------------------------------------------------------------------------ GMMPrior


def flair_phantom(seed: int = 0, noise: float = 6.0) -> dict[str, np.ndarray]:
    """Skull-stripped FLAIR-like phantom: CSF (dark) < WM < GM, plus a bright sphere lesion.

    Grey matter 90 is the outer shell (radius 13..19), white matter 70 the core (r < 13),
    ventricular CSF 30 in the centre (r < 5) and a lesion at 150 (ball of radius 6, 10
    voxels off centre, ~900 voxels). A T1-like channel has the lesion dark (CSF 20 < lesion
    50 < GM 80 < WM 110). Outside the brain both are 0, except a bright 'scalp' slab of 200
    in the FLAIR, which the brain mask excludes.
    """
    rng = np.random.default_rng(seed)
    shape = (48, 48, 40)
    c = (23.5, 23.5, 19.5)
    brain = ball(shape, c, 19)
    wm = ball(shape, c, 13)
    csf = ball(shape, c, 5)
    lesion = ball(shape, (33.5, 23.5, 19.5), 6) & ~csf
    flair = np.zeros(shape, np.float32)
    t1 = np.zeros(shape, np.float32)
    for region, value, t1_value in ((brain, 90.0, 80.0), (wm, 70.0, 110.0), (csf, 30.0, 20.0), (lesion, 150.0, 50.0)):
        flair[region] = value + rng.normal(0.0, noise, int(region.sum()))
        t1[region] = t1_value + rng.normal(0.0, noise, int(region.sum()))
    grey = brain & ~wm & ~lesion
    scalp = np.zeros(shape, bool)
    scalp[:2] = True
    flair[scalp] = 200.0
    return {"image": flair, "t1": t1, "brain": brain, "lesion": lesion, "scalp": scalp, "grey": grey}


def test_gmm_prior_flair_phantom() -> None:
    ph = flair_phantom()
    pm = GMMPrior().compute(ph["image"], ph["brain"])
    assert isinstance(pm, ProbabilityMap)
    assert pm.source == "gmm"
    assert pm.data.dtype == np.float32 and pm.shape == ph["image"].shape
    assert pm.data.min() >= 0.0 and pm.data.max() <= 1.0
    assert dice(pm.data >= 0.5, ph["lesion"]) > 0.9
    # 0 outside the mask, even on the bright scalp slab
    assert np.all(pm.data[~ph["brain"]] == 0.0)
    # provenance: JSON-serialisable, constructor args and fitted values
    params = json.loads(json.dumps(pm.params))
    assert params["K"] == 4 and params["n_components"] == 4
    assert len(params["means"]) == len(params["variances"]) == len(params["weights"]) == 4
    assert params["means"] == sorted(params["means"])
    assert params["converged"] is True
    assert params["bic_candidates"] == [2, 3, 4, 5, 6]


def test_gmm_prior_derives_mask_when_none_given() -> None:
    ph = flair_phantom(seed=1)
    image = ph["image"].copy()
    image[ph["scalp"]] = 0.0  # skull-stripped: constant 0 background
    pm = GMMPrior().compute(image)
    assert dice(pm.data >= 0.5, ph["lesion"]) > 0.9
    assert np.all(pm.data[~ph["brain"]] == 0.0)


def test_gmm_prior_bic_choice() -> None:
    # two tissues plus a lesion -> BIC picks K = 3 (paper: K chosen label-free)
    rng = np.random.default_rng(2)
    shape = (40, 40, 40)
    brain = ball(shape, (19.5,) * 3, 18)
    inner = ball(shape, (19.5,) * 3, 11)
    lesion = ball(shape, (24.5, 19.5, 19.5), 4)
    image = np.zeros(shape, np.float32)
    for region, value in ((brain, 90.0), (inner, 60.0), (lesion, 150.0)):
        image[region] = value + rng.normal(0.0, 5.0, int(region.sum()))
    pm = GMMPrior(n_components="bic", bic_candidates=(2, 3, 4, 5)).compute(image, brain)
    assert pm.params["K"] == 3
    assert pm.params["n_components"] == "bic"
    assert dice(pm.data >= 0.5, lesion) > 0.9
    json.dumps(pm.params)


def test_gmm_prior_two_foreground_components() -> None:
    # K = 4 on the FLAIR phantom fits CSF < WM < GM < lesion; n_foreground = 2 takes the two
    # brightest components, i.e. grey matter and lesion; n_foreground = 1 the lesion only
    ph = flair_phantom(seed=3)
    two = GMMPrior(n_components=4, n_foreground=2).compute(ph["image"], ph["brain"])
    one = GMMPrior(n_components=4, n_foreground=1).compute(ph["image"], ph["brain"])
    assert dice(one.data >= 0.5, ph["lesion"]) > 0.9
    assert dice(two.data >= 0.5, ph["lesion"] | ph["grey"]) > 0.9
    assert two.params["n_foreground"] == 2
    # the 2-component foreground contains the 1-component one (same fit, one more column)
    assert np.all(two.data >= one.data - 1e-6)
    np.testing.assert_allclose(two.params["means"], one.params["means"])


def test_gmm_prior_all_channels() -> None:
    # FLAIR: lesion bright; T1: lesion dark. channels="all" fits a 2-D full-covariance mixture
    ph = flair_phantom(seed=4)
    brain, lesion, flair, t1 = ph["brain"], ph["lesion"], ph["image"], ph["t1"]
    pm = GMMPrior(channels="all").compute(np.stack([flair, t1]), brain)
    assert pm.data.dtype == np.float32
    assert pm.data.min() >= 0.0 and pm.data.max() <= 1.0
    assert dice(pm.data >= 0.5, lesion) > 0.9
    assert np.all(pm.data[~brain] == 0.0)
    assert pm.params["K"] == 4 and np.asarray(pm.params["means"]).shape == (4, 2)
    assert pm.params["channels"] == "all"
    json.dumps(pm.params)
    # the foreground is the component brightest in bright_channel: with the channels
    # swapped, bright_channel=1 finds the same lesion; bright_channel=0 (now T1) takes the
    # component brightest in T1 (white matter), not the lesion
    swapped = np.stack([t1, flair])
    again = GMMPrior(channels="all", bright_channel=1).compute(swapped, brain)
    assert dice(again.data >= 0.5, lesion) > 0.9
    wrong = GMMPrior(channels="all", bright_channel=0).compute(swapped, brain)
    assert dice(wrong.data >= 0.5, lesion) < 0.1


def test_gmm_prior_bright_channel_selects_single_channel() -> None:
    ph = flair_phantom(seed=5)
    noise = np.random.default_rng(5).normal(0, 1, ph["image"].shape).astype(np.float32)
    pm = GMMPrior(bright_channel=1).compute(np.stack([noise, ph["image"]]), ph["brain"])
    assert dice(pm.data >= 0.5, ph["lesion"]) > 0.9


def ct_phantom(seed: int = 0) -> dict[str, np.ndarray]:
    """Head CT in integer HU: air -1000, skull 1000, brain 30, CSF 8, haematoma 70 HU."""
    rng = np.random.default_rng(seed)
    shape = (40, 40, 36)
    c = (19.5, 19.5, 17.5)
    inner = ball(shape, c, 14)
    skull = ball(shape, c, 16) & ~inner
    csf = ball(shape, c, 4)
    haem = ball(shape, (26.5, 19.5, 17.5), 4)
    hu = np.full(shape, -1000.0, np.float32)
    hu[skull] = 1000.0
    for region, value in ((inner, 30.0), (csf, 8.0), (haem, 70.0)):
        hu[region] = value + rng.normal(0.0, 4.0, int(region.sum()))
    return {"hu": np.round(hu).astype(np.int16), "brain": inner, "haematoma": haem}


@pytest.mark.parametrize("k", [3, 4])
def test_gmm_prior_ct_hyperdense_lesion(k: int) -> None:
    ph = ct_phantom()
    pm = GMMPrior(n_components=k, modality="ct").compute(ph["hu"])  # mask derived in HU
    assert dice(pm.data >= 0.5, ph["haematoma"]) > 0.9
    assert np.all(pm.data[~ph["brain"]] == 0.0)  # skull (1000 HU) is never lesion
    # the fit ran on the brain window [0, 1]: haematoma 70 HU -> (70 + 10) / 100 = 0.8
    assert pm.params["means"][-1] == pytest.approx(0.8, abs=0.02)
    assert pm.params["modality"] == "ct"


def test_gmm_prior_ct_bright_channel_one() -> None:
    ph = ct_phantom(seed=1)
    other = np.zeros(ph["hu"].shape, np.float32)
    other[ph["brain"]] = np.random.default_rng(1).uniform(200, 800, int(ph["brain"].sum()))
    pm = GMMPrior(n_components=3, modality="ct", bright_channel=1).compute(
        np.stack([other, ph["hu"].astype(np.float32)])
    )
    assert dice(pm.data >= 0.5, ph["haematoma"]) > 0.9


# ----------------------------------------------------------------------- GMMPrior validation


def small_volume() -> tuple[np.ndarray, np.ndarray]:
    ph = flair_phantom(seed=6)
    return ph["image"], ph["brain"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_components": 1}, "n_components"),
        ({"n_components": 2.5}, "n_components"),
        ({"n_components": "three"}, "n_components"),
        ({"n_components": 4, "n_foreground": 4}, "n_foreground"),
        ({"n_components": 3, "n_foreground": 5}, "n_foreground"),
        ({"n_foreground": 0}, "n_foreground"),
        ({"n_components": "bic", "bic_candidates": (2, 3), "n_foreground": 2}, "n_foreground"),
        ({"n_components": "bic", "bic_candidates": (1, 3)}, "bic_candidates"),
        ({"channels": "x"}, "channels"),
        ({"modality": "pet"}, "modality"),
        ({"n_bins": 8}, "n_bins"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1.0}, "tol"),
    ],
)
def test_gmm_prior_parameter_validation(kwargs, match: str) -> None:
    image, brain = small_volume()
    with pytest.raises(InvalidPriorError, match=match):
        GMMPrior(**kwargs).compute(image, brain)


@pytest.mark.parametrize("bright", [1, -1])
def test_gmm_prior_bright_channel_out_of_range(bright: int) -> None:
    image, brain = small_volume()
    with pytest.raises(InvalidImageError, match="bright_channel"):
        GMMPrior(bright_channel=bright).compute(image, brain)
    with pytest.raises(InvalidImageError, match="bright_channel"):
        GMMPrior(bright_channel=2 if bright == 1 else bright).compute(np.stack([image, image]), brain)


def test_gmm_prior_constant_image_in_mask() -> None:
    image = np.zeros((16, 16, 16), np.float32)
    brain = ball(image.shape, (7.5,) * 3, 6)
    image[brain] = 5.0
    with pytest.raises(InvalidImageError):
        GMMPrior().compute(image, brain)


def test_gmm_prior_get_params_as_given() -> None:
    kwargs = dict(
        n_components=3, n_foreground=2, channels="all", bright_channel=1, modality="ct",
        n_bins=256, max_iter=50, tol=1e-4, bic_candidates=(2, 3), random_state=7,
        foreground_rule="brightest", max_lesion_weight=0.5, min_separation=1.0,
    )
    prior = GMMPrior(**kwargs)
    assert prior.get_params() == kwargs
    assert GMMPrior().get_params() == dict(
        n_components=4, n_foreground=1, channels="bright", bright_channel=0, modality="mri",
        n_bins=1024, max_iter=100, tol=1e-3, bic_candidates=(2, 3, 4, 5, 6), random_state=0,
        foreground_rule="plausible", max_lesion_weight=0.25, min_separation=2.0,
    )
    # invalid values are stored as given; they are refused only by compute()
    assert GMMPrior(n_components=1).get_params()["n_components"] == 1
    text = repr(prior)
    assert text.startswith("GMMPrior(") and "n_components=3" in text and "n_foreground=2" in text
    # scikit-learn conventions: a list is kept as the very object given, clone round-trips
    candidates = [2, 3, 4]
    assert GMMPrior(n_components="bic", bic_candidates=candidates).get_params()["bic_candidates"] is candidates
    assert clone(prior).get_params() == kwargs


def test_gmm_prior_numpy_integer_params_json_serialisable() -> None:
    image, brain = small_volume()
    pm = GMMPrior(n_components=np.int64(4)).compute(image, brain)
    json.dumps(pm.params)
