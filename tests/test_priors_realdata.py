"""Issue 12 on the raw BraTS cases in ../shared/data (skipped when they are absent).

The data are never copied into the repository. Set ``CGC_REFINE_DATA`` to point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cgc_refine.brain import derive_brain_mask
from cgc_refine.exceptions import SpaceMismatchError
from cgc_refine.io import load_mask, load_volume
from cgc_refine.metrics import dice
from cgc_refine.priors import FilePrior, OutlierPrior, prior_diagnostics

DATA = Path(os.environ.get("CGC_REFINE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
RAW21 = DATA / "brats2021_3dbrainthesis"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not RAW21.is_dir(), reason=f"raw BraTS 2021 cases not found under {DATA}"),
]

#: whole-tumour Dice of ``_pred`` in array order, as ../shared/data/SOURCES.md lists it
PRED_DICE = {"BraTS2021_00002": 0.637, "BraTS2021_00014": 0.583, "BraTS2021_00019": 0.847}


@pytest.mark.parametrize("case", sorted(PRED_DICE))
def test_pred_prior_needs_the_option_then_matches_sources(case: str) -> None:
    folder = RAW21 / case
    volume = load_volume(folder / f"{case}_flair.nii.gz")
    truth = load_mask(folder / f"{case}_seg.nii.gz", reference=volume)
    with pytest.raises(SpaceMismatchError, match="--prior-on-image-grid"):
        FilePrior(folder / f"{case}_pred.nii.gz").compute(volume)
    pmap = FilePrior(folder / f"{case}_pred.nii.gz", on_image_grid=True).compute(volume)
    assert dice(pmap.data >= 0.5, truth) == pytest.approx(PRED_DICE[case], abs=5e-4)


def test_outlier_prior_on_a_raw_glioma() -> None:
    case = "BraTS2021_00019"
    volume = load_volume(RAW21 / case / f"{case}_flair.nii.gz")
    truth = load_mask(RAW21 / case / f"{case}_seg.nii.gz", reference=volume)
    brain = derive_brain_mask(volume.data)
    pmap = OutlierPrior().compute(volume, brain)
    assert pmap.params["standardisation"]["bias_field"][0]["applied"] is True
    diag = prior_diagnostics(pmap, brain, volume.spacing, log=False)
    assert diag["warnings"] == []
    assert 0.5 * truth.sum() < diag["voxels"] < 2.0 * truth.sum()
    assert dice(pmap.data >= 0.5, truth) > 0.6
    assert not np.any(pmap.data[~brain])
