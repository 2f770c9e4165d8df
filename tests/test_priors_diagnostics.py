"""Label-free prior diagnostics (issue 12): volumes, components and implausibility warnings."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cgc_refine.exceptions import SpaceMismatchError
from cgc_refine.priors import ProbabilityMap, prior_diagnostics
from cgc_refine.priors.diagnostics import MAX_BRAIN_FRACTION, MAX_COMPONENTS

SHAPE = (40, 40, 40)


def brain_and_lesion() -> tuple[np.ndarray, np.ndarray]:
    brain = np.zeros(SHAPE, bool)
    brain[5:35, 5:35, 5:35] = True  # 27 000 voxels
    lesion = np.zeros(SHAPE, np.float32)
    lesion[10:20, 10:20, 10:20] = 0.9  # 1000 voxels, one component
    lesion[25:28, 25:28, 25:28] = 0.7  # 27 voxels, a second one
    return brain, lesion


def test_plausible_prior_volumes_and_no_warning() -> None:
    brain, lesion = brain_and_lesion()
    pmap = ProbabilityMap(lesion, params={"tissue_mode": 1.0, "tissue_scale": 0.2, "other": 3})
    diag = prior_diagnostics(pmap, brain, (2.0, 1.0, 1.0))
    assert diag["voxels"] == 1027
    assert diag["volume_ml"] == pytest.approx(1027 * 2.0 / 1000.0)
    assert diag["brain_volume_ml"] == pytest.approx(27_000 * 2.0 / 1000.0)
    assert diag["percent_of_brain"] == pytest.approx(100.0 * 1027 / 27_000)
    assert diag["n_components"] == 2
    assert diag["largest_component_ml"] == pytest.approx(2.0)
    assert diag["expected_volume_ml"] == pytest.approx((900 + 27 * 0.7) * 2.0 / 1000.0, rel=1e-4)
    assert diag["fitted"] == {"tissue_mode": 1.0, "tissue_scale": 0.2}
    assert diag["warnings"] == []


def test_empty_prior_warns(caplog: pytest.LogCaptureFixture) -> None:
    brain, _ = brain_and_lesion()
    with caplog.at_level(logging.WARNING, logger="cgc_refine"):
        diag = prior_diagnostics(np.full(SHAPE, 0.2, np.float32), brain)
    assert diag["voxels"] == 0 and diag["n_components"] == 0
    assert len(diag["warnings"]) == 1 and "empty" in diag["warnings"][0]
    assert any("empty" in r.getMessage() for r in caplog.records)


def test_prior_over_the_stated_fraction_warns() -> None:
    brain, _ = brain_and_lesion()
    prob = np.zeros(SHAPE, np.float32)
    prob[5:35, 5:35, 5:17] = 1.0  # 40 % of the brain
    diag = prior_diagnostics(prob, brain, log=False)
    assert MAX_BRAIN_FRACTION < 0.40
    assert any("of the brain" in w for w in diag["warnings"])
    # just under the limit: no warning
    prob[:] = 0.0
    prob[5:35, 5:35, 5:13] = 1.0  # 26.7 %
    assert prior_diagnostics(prob, brain, log=False)["warnings"] == []


def test_thousands_of_specks_warn() -> None:
    brain, _ = brain_and_lesion()
    prob = np.zeros(SHAPE, np.float32)
    prob[5:35:2, 5:35:2, 5:35:2] = 1.0  # 15^3 = 3375 isolated voxels
    diag = prior_diagnostics(prob, brain, log=False)
    assert diag["n_components"] == 3375 > MAX_COMPONENTS
    assert diag["n_specks"] == 3375
    assert any("specks" in w for w in diag["warnings"])


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(SpaceMismatchError, match="brain mask shape"):
        prior_diagnostics(np.zeros(SHAPE, np.float32), np.ones((4, 4, 4), bool))
