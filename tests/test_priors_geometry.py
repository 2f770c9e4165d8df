"""External priors whose affine differs from the image's but whose shape matches (issue 12),
and the built-in prior names on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import cgc_refine.cli as cli
from cgc_refine.exceptions import SpaceMismatchError
from cgc_refine.io import load_volume, save_array, save_mask
from cgc_refine.phantom import make_phantom
from cgc_refine.priors import BUILTIN_PRIORS, FilePrior

SHAPE = (32, 32, 16)
TRAIN = ["--fast", "--iterations", "1", "--crop-size", "16", "16", "16", "--device", "cpu", "--seed", "3"]


def run(*args: object):  # noqa: ANN201
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def case(tmp_path: Path) -> dict[str, Path]:
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = [0.0, 239.0, -10.0]  # an LPS-like header with an offset, as BraTS
    phantom = make_phantom(SHAPE, affine=affine, seed=0)
    files = {"image": tmp_path / "flair.nii.gz", "truth": tmp_path / "truth.nii.gz",
             "pred": tmp_path / "pred.nii.gz", "out": tmp_path / "out"}
    save_array(phantom.volume.data[0], phantom.volume, files["image"], np.float32)
    save_mask(phantom.truth, phantom.volume, files["truth"])
    # a detector's label map saved with a lost header: identity affine, same array
    labels = np.where(phantom.truth, 2, 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(files["pred"]))
    files["out"].mkdir()
    return files


def test_same_shape_other_affine_is_refused_with_the_option_named(case: dict[str, Path]) -> None:
    volume = load_volume(case["image"])
    with pytest.raises(SpaceMismatchError) as error:
        FilePrior(case["pred"]).compute(volume)
    message = str(error.value)
    assert "same shape" in message or "image's shape" in message
    assert "--prior-on-image-grid" in message and "on_image_grid=True" in message
    assert "--resample-prior" in message


def test_on_image_grid_takes_the_array_as_is(case: dict[str, Path]) -> None:
    volume = load_volume(case["image"])
    truth = np.asanyarray(nib.load(str(case["truth"])).dataobj) > 0
    pmap = FilePrior(case["pred"], on_image_grid=True).compute(volume)
    np.testing.assert_array_equal(pmap.data >= 0.5, truth)
    np.testing.assert_allclose(pmap.affine, volume.affine)
    assert pmap.params["file"]["on_image_grid"] is True
    assert np.allclose(pmap.params["file"]["prior_affine"], np.eye(4))


def test_on_image_grid_refuses_another_shape(case: dict[str, Path], tmp_path: Path) -> None:
    volume = load_volume(case["image"])
    other = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(other))
    with pytest.raises(SpaceMismatchError, match="cannot be on the image's voxel grid"):
        FilePrior(other, on_image_grid=True).compute(volume)


def test_cli_exit_2_then_option_runs(case: dict[str, Path]) -> None:
    refused = run("--prior", case["pred"], "--image", case["image"], "-o", case["out"], *TRAIN)
    assert refused.exit_code == 2
    assert "--prior-on-image-grid" in refused.stderr
    assert list(case["out"].iterdir()) == []
    result = run("--prior", case["pred"], "--image", case["image"], "-o", case["out"],
                 "--prior-on-image-grid", "--truth", case["truth"], *TRAIN)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((case["out"] / "flair_label-lesion_mask.json").read_text())
    assert sidecar["prior"]["on_image_grid"] is True
    assert sidecar["prior"]["diagnostics"]["n_components"] >= 1
    assert sidecar["evaluation"]["prior"]["dice"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["auto", "outlier", "gmm-brightest"])
def test_cli_prior_command_every_name_with_diagnostics(case: dict[str, Path], name: str) -> None:
    assert name in BUILTIN_PRIORS
    out = case["out"] / f"{name}.nii.gz"
    result = run("prior", name, "--image", case["image"], "-o", out, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "ml marked" in result.stdout
    sidecar = json.loads(out.with_suffix("").with_suffix(".json").read_text())
    diag = sidecar["prior"]["diagnostics"]
    assert {"volume_ml", "percent_of_brain", "n_components", "fitted", "warnings"} <= set(diag)
    assert sidecar["prior"]["resolved_name"] != "auto"


def test_cli_rejects_an_unknown_prior_name(case: dict[str, Path]) -> None:
    result = run("prior", "nonsense", "--image", case["image"])
    assert result.exit_code == 2
