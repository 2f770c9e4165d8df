"""Tests on the real brain-lesion cases in ../shared/data (skipped when it is absent).

The data are never copied into the repository; CI has them beside the checkout. Set
``CGC_REFINE_DATA`` to point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cgc_refine.cohort import PRESETS, find_subjects
from cgc_refine.io import load_mask, load_volume
from cgc_refine.metrics import evaluate
from cgc_refine.priors import GMMPrior, MumfordShahPrior, as_probability_map

DATA = Path(os.environ.get("CGC_REFINE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
BRATS = DATA / "deepmedic_brats2015"
WMH = DATA / "wmh_vbnet_clinical"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not BRATS.is_dir() or not WMH.is_dir(),
        reason=f"real data not found at {DATA} (CI has ../shared/data; set CGC_REFINE_DATA to run these)",
    ),
]


@pytest.fixture(scope="module")
def brats_case():
    subject = find_subjects(BRATS, **PRESETS["brats-deepmedic"])[0]
    volume = load_volume(subject.images)
    return (
        volume,
        load_mask(subject.brain_mask, reference=volume),
        load_mask(subject.truth, reference=volume),
    )


def test_all_real_cases_are_found():
    assert len(find_subjects(BRATS, **PRESETS["brats-deepmedic"])) == 6
    assert len(find_subjects(WMH, **PRESETS["wmh-vbnet"])) == 5


def test_real_volume_geometry(brats_case):
    volume, brain, truth = brats_case
    assert volume.shape == (240, 240, 155) and volume.axcodes == ("L", "P", "S")
    assert volume.spacing == pytest.approx((1.0, 1.0, 1.0))
    # float64 brain mask stored as 0.99999997 reads as a full mask
    assert brain.dtype == bool and 1_000_000 < brain.sum() < 2_000_000
    assert truth.sum() == 111_724  # whole tumour of pat0001, as SOURCES.md lists


def test_gmm_prior_on_a_glioma(brats_case):
    volume, brain, truth = brats_case
    prior = GMMPrior().compute(volume, brain)
    scores = evaluate(prior.data >= 0.5, truth, volume.spacing)
    # Regression guard for the label-free default (measured 0.849 on this case; see
    # benchmarks/RESULTS.md); the threshold is deliberately loose.
    assert scores["dice"] > 0.75
    assert np.all(prior.data[~brain] == 0.0)


def test_mumford_shah_prior_on_a_glioma(brats_case):
    volume, brain, truth = brats_case
    prior = MumfordShahPrior(device="cpu").compute(volume, brain)
    scores = evaluate(prior.data >= 0.5, truth, volume.spacing)
    assert scores["dice"] > 0.5
    assert prior.data.dtype == np.float32 and prior.data.max() <= 1.0


def test_wmh_int16_flair_and_external_segmentation_prior():
    subject = find_subjects(WMH, **PRESETS["wmh-vbnet"])[0]
    volume = load_volume(subject.images)
    truth = load_mask(subject.truth, reference=volume)
    assert volume.spacing[2] > 7.0  # thick-slice clinical acquisition
    gmm = GMMPrior().compute(volume)
    assert gmm.params["converged"] and 0.0 < gmm.foreground_fraction() < 0.5
    external = as_probability_map(subject.extra["seg"], reference=volume)
    assert external.source == "mask"  # inferred from its {0, 1} values
    assert evaluate(external.data >= 0.5, truth, volume.spacing)["dice"] > 0.3
