"""Tests of the ``cgc-refine`` command line (CPU, tiny phantoms, a few training steps)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cgc_refine.cli as cli
from cgc_refine._version import __version__
from cgc_refine.config import RefinerConfig
from cgc_refine.io import save_array, save_mask
from cgc_refine.metrics import evaluate
from cgc_refine.phantom import make_phantom, noisy_prior
from cgc_refine.workflow.models import checkpoint_facts

SHAPE = (32, 32, 16)
CROP = ["--crop-size", "16", "16", "16"]  # hidden option: tiny training crops keep tests fast
TRAIN = ["--fast", "--iterations", "1", *CROP, "--device", "cpu", "--seed", "3"]
MASK_NAME = "flair_label-lesion_mask.nii.gz"
PROBSEG_NAME = "flair_label-lesion_probseg.nii.gz"
SIDECAR_NAME = "flair_label-lesion_mask.json"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def las_affine() -> np.ndarray:
    affine = np.diag([-1.2, 1.0, 2.0, 1.0])
    affine[:3, 3] = [20.0, -16.0, -15.0]
    return affine


def oblique_affine() -> np.ndarray:
    """Rotated about two axes, anisotropic, with a flipped axis."""
    a, b = 0.3, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([1.1, -0.9, 2.2])
    affine[:3, 3] = [-10.0, 25.0, 3.5]
    return affine


def write_subject(folder: Path, affine: np.ndarray, *, seed: int = 0) -> dict[str, Path]:
    """A tiny phantom on ``affine``: image, truth, brain mask and a noisy probability prior."""
    folder.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(SHAPE, affine=affine, seed=seed)
    volume = phantom.volume
    prior = noisy_prior(phantom.truth, phantom.brain, flip_fraction=0.05, seed=seed)
    files = {
        "image": folder / "flair.nii.gz",
        "truth": folder / "truth.nii.gz",
        "brain": folder / "brain.nii.gz",
        "prior": folder / "prior.nii.gz",
    }
    save_array(volume.data[0], volume, files["image"], np.float32)
    save_mask(phantom.truth, volume, files["truth"])
    save_mask(phantom.brain, volume, files["brain"])
    save_array(prior, volume, files["prior"], np.float32)
    return files


def run(*args: object):  # noqa: ANN201 - click's Result
    """Invoke the CLI in-process; errors are expected to be handled by the CLI itself."""
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def listing(folder: Path) -> list[str]:
    """Every entry of a folder, hidden files included."""
    return sorted(os.listdir(folder))


def error_lines(result) -> list[str]:  # noqa: ANN001
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(result, phrase: str) -> None:  # noqa: ANN001
    lines = error_lines(result)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("cgc-refine: error: "), lines
    assert phrase.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.stderr


def check_geometry(path: Path, reference: Path, dtype: type) -> nib.Nifti1Image:
    img = nib.load(str(path))
    ref = nib.load(str(reference))
    assert img.get_data_dtype() == np.dtype(dtype)
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(ref.affine)
    assert int(img.header["sform_code"]) == int(ref.header["sform_code"])
    assert int(img.header["qform_code"]) == int(ref.header["qform_code"])
    np.testing.assert_allclose(img.header.get_zooms(), ref.header.get_zooms(), atol=1e-5)
    return img


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def subject(tmp_path: Path) -> dict[str, Path]:
    files = write_subject(tmp_path / "in", las_affine())
    files["out"] = tmp_path / "out"
    files["out"].mkdir()
    return files


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One model trained on the LAS phantom (saved with --save-model)."""
    root = tmp_path_factory.mktemp("model")
    files = write_subject(root / "in", las_affine())
    model = root / "model.pt"
    result = run("--prior", files["prior"], "--image", files["image"], "-o", root / "seg.nii.gz",
                 "--save-model", model, "-q", *TRAIN)
    assert result.exit_code == 0, result.stderr
    files["model"] = model
    return files


# --------------------------------------------------------------------------------------------
# help, version, usage
# --------------------------------------------------------------------------------------------


def test_help_does_not_import_heavy_modules() -> None:
    code = textwrap.dedent(
        """
        import sys
        from click.testing import CliRunner
        import cgc_refine.cli
        for args in (["--help"], ["fit", "--help"], ["predict", "--help"], ["demo", "--help"],
                     ["evaluate", "--help"], ["prior", "--help"], ["--version"]):
            result = CliRunner().invoke(cgc_refine.cli.main, args)
            assert result.exit_code == 0, (args, result.output)
        heavy = [m for m in ("torch", "nibabel", "numpy", "scipy", "sklearn") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"cgc-refine {__version__}"


def test_no_arguments_prints_help() -> None:
    result = run()
    assert result.exit_code == 0
    assert "Usage:" in result.stdout
    assert "predict" in result.stdout and "demo" in result.stdout


def test_unknown_option_is_one_line_usage_error() -> None:
    result = run("--no-such-option")
    assert_one_line_error(result, "no such option")


def test_missing_image_is_usage_error() -> None:
    result = run("--prior", "gmm")
    assert_one_line_error(result, "--image")


def test_group_options_before_subcommand_are_refused(subject: dict[str, Path]) -> None:
    result = run("--fast", "demo")
    assert_one_line_error(result, "single-subject")


def test_group_level_quiet_applies_to_subcommand(subject: dict[str, Path]) -> None:
    result = run("-q", "prior", "gmm", "--image", subject["image"], "-o", subject["out"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert len(listing(subject["out"])) == 2


def test_quiet_and_verbose_conflict(subject: dict[str, Path]) -> None:
    result = run("--prior", "gmm", "--image", subject["image"], "-q", "-v")
    assert_one_line_error(result, "cannot be used together")


# --------------------------------------------------------------------------------------------
# single subject
# --------------------------------------------------------------------------------------------


def test_single_subject_default_output_next_to_image(subject: dict[str, Path]) -> None:
    result = run("--prior", "gmm", "--image", subject["image"], "--save-proba", *TRAIN)
    assert result.exit_code == 0, result.stderr
    folder = subject["image"].parent
    mask_path, proba_path, sidecar_path = (folder / MASK_NAME, folder / PROBSEG_NAME,
                                           folder / SIDECAR_NAME)
    assert f"wrote {mask_path}" in result.stdout
    mask = check_geometry(mask_path, subject["image"], np.uint8)
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}
    proba = check_geometry(proba_path, subject["image"], np.float32)
    values = np.asanyarray(proba.dataobj)
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert not [name for name in listing(folder) if name.startswith(".")]

    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["cgc_refine_version"] == __version__
    assert sidecar["prior"]["name"] == "gmm" and sidecar["prior"]["kind"] == "gmm"
    assert sidecar["prior"]["params"]["K"] >= 2
    assert sidecar["seed"] == 3
    assert sidecar["device"] == "cpu"
    assert sidecar["config"] == RefinerConfig.fast(iterations=1, crop_size=(16, 16, 16)).validate().to_dict()
    assert sidecar["inputs"]["images"] == [str(subject["image"].resolve())]
    assert sidecar["inputs"]["brain_mask"] == "derived"
    assert sidecar["outputs"]["mask"] == str(mask_path.resolve())
    assert sidecar["outputs"]["probability"] == str(proba_path.resolve())
    assert sidecar["training"]["n_iter"] == 1
    for key in ("load_s", "prior_s", "train_s", "inference_s", "write_s", "total_s"):
        assert sidecar["timings"][key] >= 0.0
    assert sidecar["lesion"]["voxels"] == int(np.asanyarray(mask.dataobj).sum())
    assert sidecar["lesion"]["fraction_of_prior"] == pytest.approx(
        sidecar["lesion"]["voxels"] / sidecar["prior"]["foreground_voxels"])


def test_single_subject_oblique_external_prior_into_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.console, "_stderr_is_tty", lambda: True)  # exercise the progress bars
    files = write_subject(tmp_path / "in", oblique_affine())
    out = tmp_path / "out"
    out.mkdir()
    result = run("--prior", files["prior"], "--prior-kind", "probability", "--image", files["image"],
                 "--brain-mask", files["brain"], "-o", out, "--save-proba", "--threshold", "0.4",
                 "--min-size-mm3", "3", "-v", *TRAIN)
    assert result.exit_code == 0, result.stderr
    assert "cgc-refine: info: training on 1 subject(s)" in result.stderr
    assert "training" in result.stderr and "Traceback" not in result.stderr
    assert listing(out) == sorted([MASK_NAME, PROBSEG_NAME, SIDECAR_NAME])
    check_geometry(out / MASK_NAME, files["image"], np.uint8)
    check_geometry(out / PROBSEG_NAME, files["image"], np.float32)
    sidecar = json.loads((out / SIDECAR_NAME).read_text())
    assert sidecar["prior"]["kind"] == "probability"
    assert sidecar["prior"]["path"] == str(files["prior"].resolve())
    assert sidecar["inputs"]["brain_mask"] == str(files["brain"].resolve())
    assert sidecar["threshold"] == 0.4 and sidecar["min_size_mm3"] == 3.0
    assert listing(files["image"].parent) == sorted(p.name for p in files.values())


def test_single_subject_output_file_and_overwrite(subject: dict[str, Path]) -> None:
    target = subject["out"] / "lesions.nii"
    args = ["--prior", subject["truth"], "--image", subject["image"], "-o", target, "--save-proba",
            *TRAIN, "-q"]
    first = run(*args)
    assert first.exit_code == 0, first.stderr
    assert first.stdout == ""  # -q: no result lines
    assert listing(subject["out"]) == ["lesions.json", "lesions.nii", "lesions_probseg.nii"]
    check_geometry(target, subject["image"], np.uint8)
    sidecar = json.loads((subject["out"] / "lesions.json").read_text())
    assert sidecar["prior"]["kind"] == "mask"  # inferred from the values
    before = (subject["out"] / "lesions.json").read_text()
    again = run(*args)
    assert_one_line_error(again, "already exists")
    assert (subject["out"] / "lesions.json").read_text() == before


def test_overwrite_replaces_outputs(subject: dict[str, Path]) -> None:
    target = subject["out"] / "p.nii.gz"
    args = ["prior", "gmm", "--image", subject["image"], "-o", target]
    assert run(*args).exit_code == 0
    stamp = json.loads((subject["out"] / "p.json").read_text())["created"]
    assert_one_line_error(run(*args), "already exists")
    replaced = run(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert listing(subject["out"]) == ["p.json", "p.nii.gz"]
    assert json.loads((subject["out"] / "p.json").read_text())["created"] >= stamp


def test_resample_prior(subject: dict[str, Path]) -> None:
    image = nib.load(str(subject["image"]))
    truth = np.asanyarray(nib.load(str(subject["truth"])).dataobj)
    shifted = image.affine.copy()
    shifted[:3, 3] += [0.6, -0.4, 0.0]
    moved_prior = subject["out"].parent / "moved_prior.nii.gz"
    nib.save(nib.Nifti1Image(truth.astype(np.uint8), shifted), str(moved_prior))

    refused = run("--prior", moved_prior, "--image", subject["image"], "-o", subject["out"], *TRAIN)
    assert_one_line_error(refused, "--resample-prior")
    assert listing(subject["out"]) == []

    result = run("--prior", moved_prior, "--image", subject["image"], "-o", subject["out"],
                 "--resample-prior", *TRAIN)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((subject["out"] / SIDECAR_NAME).read_text())
    assert sidecar["prior"]["resampled"] is True
    assert sidecar["prior"]["resample_order"] == 0  # a mask: nearest neighbour
    assert sidecar["prior"]["kind"] == "mask"
    check_geometry(subject["out"] / MASK_NAME, subject["image"], np.uint8)


def test_save_model_then_predict(trained_model: dict[str, Path], tmp_path: Path) -> None:
    result = run("predict", "--model", trained_model["model"], "--image", trained_model["image"],
                 "-o", tmp_path, "--save-proba", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    check_geometry(tmp_path / MASK_NAME, trained_model["image"], np.uint8)
    check_geometry(tmp_path / PROBSEG_NAME, trained_model["image"], np.float32)
    sidecar = json.loads((tmp_path / SIDECAR_NAME).read_text())
    assert sidecar["command"] == "predict"
    assert sidecar["inputs"]["model"] == str(trained_model["model"].resolve())
    assert sidecar["model"]["n_channels"] == 1 and sidecar["model"]["n_iter"] == 1
    assert sidecar["seed"] == 3


def test_predict_with_the_subjects_prior_blends_and_guards(trained_model: dict[str, Path], tmp_path: Path) -> None:
    """A hard (mask) prior states no uncertainty: the blend returns the cleaned prior itself,
    so the probability is 0/1 and the mask is that probability's; the sidecar records both."""
    result = run("predict", "--model", trained_model["model"], "--image", trained_model["image"],
                 "--prior", trained_model["truth"], "--prior-kind", "mask", "-o", tmp_path, "--save-proba",
                 "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    probability = np.asarray(nib.load(tmp_path / PROBSEG_NAME).dataobj)
    mask = np.asarray(nib.load(tmp_path / MASK_NAME).dataobj)
    assert set(np.unique(probability)) <= {0.0, 1.0} and probability.any()
    np.testing.assert_array_equal(mask, (probability >= 0.5).astype(np.uint8))
    sidecar = json.loads((tmp_path / SIDECAR_NAME).read_text())
    assert sidecar["inputs"]["prior"] == str(trained_model["truth"].resolve())
    assert sidecar["prior"]["kind"] == "mask" and "guard" in sidecar["refinement"]
    # the same label-free block as the single-subject job's: the output is the cleaned prior
    assert sidecar["refinement"]["recipe"]["output_blend"] == "confidence"
    assert sidecar["refinement"]["dice_with_prior"] > 0.9
    (tmp_path / "plain").mkdir()
    without = run("predict", "--model", trained_model["model"], "--image", trained_model["image"],
                  "-o", tmp_path / "plain", "--save-proba", "--device", "cpu", "-q")
    assert without.exit_code == 0, without.stderr
    plain = np.asarray(nib.load(tmp_path / "plain" / PROBSEG_NAME).dataobj)
    assert not np.array_equal(plain, probability)  # the network alone is not the prior


def test_predict_over_a_folder_takes_only_a_builtin_prior(trained_model: dict[str, Path]) -> None:
    folder = trained_model["image"].parent
    result = run("predict", "--model", trained_model["model"], "--image", folder,
                 "--prior", trained_model["prior"], "-q")
    assert result.exit_code == 2 and "built-in prior" in result.stderr


def test_predict_oblique_image_with_model(trained_model: dict[str, Path], tmp_path: Path) -> None:
    files = write_subject(tmp_path / "in", oblique_affine(), seed=1)
    result = run("predict", "--model", trained_model["model"], "--image", files["image"],
                 "--brain-mask", files["brain"], "--threshold", "0.3", "--device", "cpu", "-q")
    assert result.exit_code == 0, result.stderr
    check_geometry(files["image"].parent / MASK_NAME, files["image"], np.uint8)


# --------------------------------------------------------------------------------------------
# prior, fit, evaluate, demo
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gmm", "mumford-shah"])
def test_prior_command(subject: dict[str, Path], name: str) -> None:
    target = subject["out"] / "prior.nii.gz"
    result = run("prior", name, "--image", subject["image"], "--brain-mask", subject["brain"],
                 "-o", target, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    img = check_geometry(target, subject["image"], np.float32)
    values = np.asanyarray(img.dataobj)
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.5
    sidecar = json.loads((subject["out"] / "prior.json").read_text())
    assert sidecar["prior"]["name"] == name and sidecar["prior"]["kind"] == name
    assert sidecar["command"] == "prior"
    assert listing(subject["out"]) == ["prior.json", "prior.nii.gz"]


def test_prior_command_ct(tmp_path: Path) -> None:
    phantom = make_phantom(SHAPE, modality="ct", affine=oblique_affine(), seed=2)
    image = tmp_path / "ct.nii.gz"
    save_array(phantom.volume.data[0], phantom.volume, image, np.float32)
    result = run("prior", "gmm", "--image", image, "--modality", "ct", "-q")
    assert result.exit_code == 0, result.stderr
    written = check_geometry(tmp_path / "ct_label-lesion_desc-gmm_probseg.nii.gz", image, np.float32)
    probability = np.asanyarray(written.dataobj)
    assert probability[phantom.truth].mean() > probability[phantom.brain & ~phantom.truth].mean()
    sidecar = json.loads((tmp_path / "ct_label-lesion_desc-gmm_probseg.json").read_text())
    assert sidecar["modality"] == "ct"


def test_unknown_builtin_prior_name(subject: dict[str, Path]) -> None:
    result = run("--prior", "gmn", "--image", subject["image"], "-o", subject["out"], *TRAIN)
    assert_one_line_error(result, "neither a built-in prior")
    assert listing(subject["out"]) == []


def test_missing_output_folder(subject: dict[str, Path]) -> None:
    missing = subject["out"] / "not" / "there"
    result = run("--prior", "gmm", "--image", subject["image"], "-o", missing, *TRAIN)
    assert_one_line_error(result, "does not exist")
    assert listing(subject["out"]) == []


def test_prior_command_default_name(subject: dict[str, Path]) -> None:
    result = run("prior", "gmm", "--image", subject["image"], "-q")
    assert result.exit_code == 0, result.stderr
    assert (subject["image"].parent / "flair_label-lesion_desc-gmm_probseg.nii.gz").is_file()


def _cohort(root: Path) -> Path:
    for index, affine in enumerate((las_affine(), oblique_affine())):
        files = write_subject(root / f"sub-{index + 1:02d}", affine, seed=index)
        files["truth"].unlink()
    return root


def test_fit_on_cohort_folder_then_predict(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path / "cohort")
    model = tmp_path / "model.pt"
    result = run("fit", "--cohort", cohort, "--image-pattern", "flair*", "--prior-pattern",
                 "prior.nii.gz", "--mask-pattern", "brain*", "-o", model, *TRAIN)
    assert result.exit_code == 0, result.stderr
    assert model.is_file()
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert [s["subject"] for s in sidecar["inputs"]["subjects"]] == ["sub-01", "sub-02"]
    assert all(s["prior"]["kind"] == "probability" for s in sidecar["inputs"]["subjects"])
    image = cohort / "sub-02" / "flair.nii.gz"
    predicted = run("predict", "--model", model, "--image", image, "-o", tmp_path / "p.nii.gz", "-q")
    assert predicted.exit_code == 0, predicted.stderr
    check_geometry(tmp_path / "p.nii.gz", image, np.uint8)


def test_a_cohort_fitted_with_intensity_alignment_needs_the_prior_to_predict(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path / "cohort")
    model = tmp_path / "model.pt"
    result = run("fit", "--cohort", cohort, "--image-pattern", "flair*", "--prior-pattern", "prior.nii.gz",
                 "--mask-pattern", "brain*", "--intensity-alignment", "prior", "-o", model, *TRAIN, "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "model.json").read_text())["config"]["intensity_alignment"] == "prior"
    subject = cohort / "sub-02"
    refused = run("predict", "--model", model, "--image", subject / "flair.nii.gz", "-o", tmp_path / "p.nii.gz")
    assert refused.exit_code == 2 and "--prior" in refused.stderr
    assert not (tmp_path / "p.nii.gz").exists()
    predicted = run("predict", "--model", model, "--image", subject / "flair.nii.gz", "--prior",
                    subject / "prior.nii.gz", "-o", tmp_path / "p.nii.gz", "-q")
    assert predicted.exit_code == 0, predicted.stderr
    check_geometry(tmp_path / "p.nii.gz", subject / "flair.nii.gz", np.uint8)


def test_fit_from_csv_with_builtin_prior(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path / "cohort")
    table = tmp_path / "subjects.csv"
    table.write_text("subject,image,brain_mask\n"
                     "a,cohort/sub-01/flair.nii.gz,cohort/sub-01/brain.nii.gz\n"
                     "b,cohort/sub-02/flair.nii.gz,\n")
    result = run("fit", "--csv", table, "--prior", "gmm", "-o", tmp_path / "m.pt", *TRAIN, "-q")
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["prior"]["name"] == "gmm"
    assert [s["brain_mask"] for s in sidecar["inputs"]["subjects"]][1] == "derived"


def test_fit_usage_errors(tmp_path: Path) -> None:
    assert_one_line_error(run("fit", "--cohort", tmp_path, "--image-pattern", "x*"), "-o")
    both = run("fit", "--cohort", tmp_path, "--csv", tmp_path / "a.csv", "-o", tmp_path / "m.pt")
    assert_one_line_error(both, "exactly one")
    empty = run("fit", "--cohort", tmp_path, "--image-pattern", "x*", "-o", tmp_path / "m.pt")
    assert_one_line_error(empty, "no subject found")
    assert listing(tmp_path) == []


def test_evaluate_files_and_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    affine = las_affine()
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    truth_dir.mkdir()
    expected = {}
    for name in ("a", "b"):
        truth = np.zeros(SHAPE, dtype=np.uint8)
        truth[8:16, 10:20, 4:9] = 1
        pred = truth.copy()
        pred[rng.random(SHAPE) < 0.02] = 1
        pred[8:10] = 0
        nib.save(nib.Nifti1Image(truth, affine), str(truth_dir / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(pred, affine), str(pred_dir / f"{name}.nii.gz"))
        zooms = nib.load(str(truth_dir / f"{name}.nii.gz")).header.get_zooms()
        expected[name] = evaluate(pred, truth, spacing=zooms)

    table = tmp_path / "metrics.csv"
    result = run("evaluate", "--pred", pred_dir, "--truth", truth_dir, "--csv", table)
    assert result.exit_code == 0, result.stderr
    with open(table, newline="") as handle:
        rows = {row["subject"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"a", "b", "mean"}
    for name in ("a", "b"):
        for key in cli.METRIC_NAMES:
            assert float(rows[name][key]) == expected[name][key]
    for key in cli.METRIC_NAMES:
        assert float(rows["mean"][key]) == pytest.approx(np.mean([expected[n][key] for n in "ab"]))
    assert "mean" in result.stdout and f"{expected['a']['dice']:.4f}" in result.stdout

    single = run("evaluate", "--pred", pred_dir / "a.nii.gz", "--truth", truth_dir / "a.nii.gz")
    assert single.exit_code == 0, single.stderr
    assert f"{expected['a']['hd95']:.4f}" in single.stdout
    again = run("evaluate", "--pred", pred_dir, "--truth", truth_dir, "-o", table)
    assert_one_line_error(again, "already exists")


def test_evaluate_grid_mismatch(tmp_path: Path) -> None:
    truth = np.zeros(SHAPE, dtype=np.uint8)
    nib.save(nib.Nifti1Image(truth, las_affine()), str(tmp_path / "t.nii.gz"))
    nib.save(nib.Nifti1Image(truth[:, :, :8], las_affine()), str(tmp_path / "p.nii.gz"))
    result = run("evaluate", "--pred", tmp_path / "p.nii.gz", "--truth", tmp_path / "t.nii.gz")
    assert_one_line_error(result, "shapes differ")


def test_demo_writes_files(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run("demo", "--iterations", "1", "--shape", "32", "32", "16", *CROP, "--device", "cpu",
                 "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "prior Dice (GMM):" in result.stdout and "refined Dice:" in result.stdout
    names = listing(out)
    assert "phantom_FLAIR.nii.gz" in names and "phantom_FLAIR_label-lesion_mask.json" in names
    check_geometry(out / "phantom_FLAIR_label-lesion_mask.nii.gz", out / "phantom_FLAIR.nii.gz", np.uint8)
    sidecar = json.loads((out / "phantom_FLAIR_label-lesion_mask.json").read_text())
    assert 0.0 <= sidecar["dice"]["refined"] <= 1.0
    again = run("demo", "--iterations", "1", "--shape", "32", "32", "16", *CROP, "-o", out)
    assert_one_line_error(again, "already exists")


# --------------------------------------------------------------------------------------------
# progress bars, logging, interrupts, unexpected errors
# --------------------------------------------------------------------------------------------


def test_keyboard_interrupt_during_training(
    subject: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cgc_refine.refiner import Refiner

    def interrupted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(Refiner, "fit", interrupted)
    result = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"], *TRAIN)
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert listing(subject["out"]) == []


def test_keyboard_interrupt_while_writing_removes_outputs(
    subject: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cgc_refine.io as cio

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(cio, "save_probability_map", interrupted)
    result = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"],
                 "--save-proba", "--save-model", subject["out"] / "m.pt", *TRAIN)
    assert result.exit_code == 130
    assert listing(subject["out"]) == []  # model and mask written first, then rolled back


def test_unexpected_error_is_one_line_exit_1(
    subject: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cgc_refine.refiner import Refiner

    def broken(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise RuntimeError("boom")

    monkeypatch.setattr(Refiner, "fit", broken)
    result = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"], *TRAIN)
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1 and "unexpected RuntimeError: boom" in lines[0]
    verbose = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"], "-v", *TRAIN)
    assert verbose.exit_code == 1
    assert "Traceback" in verbose.stderr
    assert listing(subject["out"]) == []


# --------------------------------------------------------------------------------------------
# bad inputs: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, las_affine() if affine is None else affine), str(path))
    return path


def _image(s: dict[str, Path]) -> np.ndarray:
    return np.asanyarray(nib.load(str(s["image"])).dataobj)


def _case_missing_file(s):  # noqa: ANN001, ANN202
    return ["--prior", "gmm", "--image", s["image"].parent / "nope.nii.gz"], "does not exist"


def _case_not_nifti(s):  # noqa: ANN001, ANN202
    path = s["image"].parent / "image.txt"
    path.write_text("not an image")
    return ["--prior", "gmm", "--image", path], "not a NIfTI"


def _case_truncated(s):  # noqa: ANN001, ANN202
    data = s["image"].read_bytes()
    path = s["image"].parent / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return ["--prior", "gmm", "--image", path], "truncated or corrupt"


def _case_2d(s):  # noqa: ANN001, ANN202
    path = _write_nifti(s["image"].parent / "slice.nii.gz", np.ones((32, 32), np.float32))
    return ["--prior", "gmm", "--image", path], "2-D image"


def _case_4d(s):  # noqa: ANN001, ANN202
    path = _write_nifti(s["image"].parent / "series.nii.gz", np.ones((8, 8, 8, 3), np.float32))
    return ["--prior", "gmm", "--image", path], "4-D image"


def _case_shape_mismatch(s):  # noqa: ANN001, ANN202
    prior = np.asanyarray(nib.load(str(s["prior"])).dataobj)[:, :, :10]
    path = _write_nifti(s["image"].parent / "small_prior.nii.gz", np.ascontiguousarray(prior))
    return ["--prior", path, "--image", s["image"]], "shapes differ"


def _case_affine_mismatch(s):  # noqa: ANN001, ANN202
    affine = las_affine()
    affine[:3, 3] += 5.0
    prior = np.asanyarray(nib.load(str(s["prior"])).dataobj)
    path = _write_nifti(s["image"].parent / "moved_prior.nii.gz", prior, affine)
    return ["--prior", path, "--image", s["image"]], "--resample-prior"


def _case_nan_image(s):  # noqa: ANN001, ANN202
    data = _image(s).copy()
    data[3, 4, 5] = np.nan
    data[4, 4, 5] = np.inf
    path = _write_nifti(s["image"].parent / "nan.nii.gz", data)
    return ["--prior", "gmm", "--image", path], "1 NaN and 1 infinite"


def _case_nan_prior(s):  # noqa: ANN001, ANN202
    prior = np.asanyarray(nib.load(str(s["prior"])).dataobj).copy()
    prior[10, 10, 5] = np.nan
    path = _write_nifti(s["image"].parent / "nan_prior.nii.gz", prior)
    return ["--prior", path, "--image", s["image"]], "NaN"


def _case_prior_out_of_range(s):  # noqa: ANN001, ANN202
    prior = np.asanyarray(nib.load(str(s["prior"])).dataobj) * 3.0 - 1.0
    path = _write_nifti(s["image"].parent / "scores.nii.gz", prior.astype(np.float32))
    return ["--prior", path, "--prior-kind", "probability", "--image", s["image"]], "must lie in [0, 1]"


def _case_empty_prior(s):  # noqa: ANN001, ANN202
    path = _write_nifti(s["image"].parent / "empty.nii.gz", np.zeros(SHAPE, np.float32))
    return ["--prior", path, "--image", s["image"]], "prior is empty"


def _case_full_prior(s):  # noqa: ANN001, ANN202
    path = _write_nifti(s["image"].parent / "full.nii.gz", np.ones(SHAPE, np.float32))
    return ["--prior", path, "--image", s["image"], "--brain-mask", s["brain"]], "every brain voxel"


def _case_constant_image(s):  # noqa: ANN001, ANN202
    path = _write_nifti(s["image"].parent / "constant.nii.gz", np.full(SHAPE, 7.0, np.float32))
    return ["--prior", "gmm", "--image", path], "is constant"


def _case_empty_brain_mask(s):  # noqa: ANN001, ANN202
    path = _write_nifti(s["image"].parent / "nobrain.nii.gz", np.zeros(SHAPE, np.uint8))
    return ["--prior", "gmm", "--image", s["image"], "--brain-mask", path], "brain mask file"


def _case_output_exists(s):  # noqa: ANN001, ANN202
    (s["out"] / MASK_NAME).write_bytes(b"keep me")
    return ["--prior", "gmm", "--image", s["image"]], "already exists"


def _case_output_not_writable(s, monkeypatch):  # noqa: ANN001, ANN202
    folder = s["out"]
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(path).resolve() == folder.resolve() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return ["--prior", "gmm", "--image", s["image"]], "not writable"


def _case_cuda_absent(s):  # noqa: ANN001, ANN202
    if torch.cuda.is_available():
        pytest.skip("CUDA is present on this machine")
    args = ["--prior", "gmm", "--image", s["image"], "--fast", "--iterations", "1", "--device", "cuda"]
    return args, "CUDA is not available"


def _case_corrupted_model(s):  # noqa: ANN001, ANN202
    model = s["image"].parent / "model.pt"
    model.write_bytes(b"\x80\x02 definitely not a checkpoint")
    return ["predict", "--model", model, "--image", s["image"]], "corrupted"


def _case_model_channels(s, model):  # noqa: ANN001, ANN202
    second = s["image"].parent / "t1.nii.gz"
    shutil.copy(s["image"], second)
    return ["predict", "--model", model, "--image", s["image"], "--image", second], "channel"


BAD_INPUTS = {
    "missing-file": _case_missing_file,
    "not-nifti": _case_not_nifti,
    "truncated-gz": _case_truncated,
    "2d-image": _case_2d,
    "4d-image": _case_4d,
    "shape-mismatch": _case_shape_mismatch,
    "affine-mismatch": _case_affine_mismatch,
    "nan-inf-image": _case_nan_image,
    "nan-prior": _case_nan_prior,
    "prior-out-of-range": _case_prior_out_of_range,
    "empty-prior": _case_empty_prior,
    "full-prior": _case_full_prior,
    "constant-image": _case_constant_image,
    "empty-brain-mask": _case_empty_brain_mask,
    "output-exists": _case_output_exists,
    "output-not-writable": _case_output_not_writable,
    "cuda-absent": _case_cuda_absent,
    "corrupted-model": _case_corrupted_model,
    "model-channels": _case_model_channels,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(
    case: str, subject: dict[str, Path], trained_model: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    build = BAD_INPUTS[case]
    if case == "output-not-writable":
        args, phrase = build(subject, monkeypatch)
    elif case == "model-channels":
        args, phrase = build(subject, trained_model["model"])
    else:
        args, phrase = build(subject)
    before_out = listing(subject["out"])
    before_in = listing(subject["image"].parent)
    extra = [] if "--fast" in args or args[0] == "predict" else TRAIN
    result = run(*args, "-o", subject["out"], *extra)
    assert_one_line_error(result, phrase)
    assert listing(subject["out"]) == before_out  # no output, no hidden temporary file
    assert listing(subject["image"].parent) == before_in
    if case == "output-exists":
        assert (subject["out"] / MASK_NAME).read_bytes() == b"keep me"


# --------------------------------------------------------------------------------------------
# the installed console script, as a real subprocess
# --------------------------------------------------------------------------------------------


def _console_script() -> str:
    exe = shutil.which("cgc-refine")
    if exe is None:
        pytest.skip("the cgc-refine console script is not on PATH (pip install -e . first)")
    return exe


def test_console_script_single_subject(tmp_path: Path) -> None:
    exe = _console_script()
    files = write_subject(tmp_path / "in", oblique_affine())
    done = subprocess.run(
        [exe, "--prior", "gmm", "--image", str(files["image"]), "--save-proba", *TRAIN],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    folder = files["image"].parent
    check_geometry(folder / MASK_NAME, files["image"], np.uint8)
    check_geometry(folder / PROBSEG_NAME, files["image"], np.float32)
    assert json.loads((folder / SIDECAR_NAME).read_text())["cgc_refine_version"] == __version__
    failed = subprocess.run([exe, "--prior", "gmm", "--image", str(files["image"]), *TRAIN],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2
    assert failed.stderr.strip().startswith("cgc-refine: error: output")
    assert len(failed.stderr.strip().splitlines()) == 1


def test_console_script_demo(tmp_path: Path) -> None:
    exe = _console_script()
    done = subprocess.run(
        [exe, "demo", "--iterations", "1", "--shape", "32", "32", "16", *CROP, "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "prior Dice (GMM):" in done.stdout and "refined Dice:" in done.stdout
    assert listing(tmp_path) == []  # nothing written without -o


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default (see the interrupt test)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_console_script_interrupt_exits_without_output(tmp_path: Path, signum: int, code: int) -> None:
    """Ctrl-C (SIGINT) and ``kill`` (SIGTERM) mid-training leave no output at all."""
    exe = _console_script()
    files = write_subject(tmp_path / "in", las_affine())
    out = tmp_path / "out"
    out.mkdir()
    args = [exe, "--prior", "gmm", "--image", str(files["image"]), "-o", str(out), "--save-proba",
            "-v", "--fast", "--iterations", "100000", *CROP, "--device", "cpu"]
    # A test run started as a background job (``pytest &`` in a script) inherits SIGINT as ignored,
    # and Python keeps an ignored SIGINT ignored: give the child the default disposition, as a
    # command started from a terminal has.
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_sigint)
    try:
        for line in process.stderr:  # type: ignore[union-attr]
            if "training on" in line:
                break
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == code, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert listing(out) == []


def test_console_script_version_and_help() -> None:
    exe = _console_script()
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"cgc-refine {__version__}"
    bad = subprocess.run([exe, "predict"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("cgc-refine: error: Missing option '--model'")


def test_gzip_helper_sanity(tmp_path: Path) -> None:
    """The truncated-file case really is a broken gzip stream (guards the test itself)."""
    files = write_subject(tmp_path, las_affine())
    data = files["image"].read_bytes()
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(data[: len(data) // 2])


@pytest.mark.parametrize(("prior", "refined", "warns"), [
    (1000, 1000, False), (1000, 500, False), (1000, 2000, False),
    (1000, 499, True), (1000, 2001, True), (0, 50, False),
])
def test_volume_change_warning_thresholds(prior: int, refined: int, warns: bool) -> None:
    from cgc_refine.cli import volume_change_warning

    message = volume_change_warning(prior, refined)
    assert (message is not None) == warns
    if warns:
        assert f"{refined} lesion voxels" in message and f"{prior}" in message


# --------------------------------------------------------------------------------------------
# issue 13: seeds, image as prior, model files, warnings, overwrite wording, threads, writes
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def keep_torch_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("seed", ["-1", str(2**70), "4294967296", "abc"])
def test_bad_seed_is_one_line_exit_2(subject: dict[str, Path], seed: str) -> None:
    single = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"],
                 *TRAIN[:-2], "--seed", seed)
    assert_one_line_error(single, "--seed")
    cohort = _cohort(subject["out"].parent / "cohort")
    fit = run("fit", "--cohort", cohort, "--image-pattern", "flair.nii.gz", "-o",
              subject["out"] / "m.pt", *TRAIN[:-2], "--seed", seed)
    assert_one_line_error(fit, "--seed")
    demo = run("demo", "--iterations", "1", "--seed", seed)
    assert_one_line_error(demo, "--seed")
    assert listing(subject["out"]) == []


def test_largest_seed_is_accepted(subject: dict[str, Path], keep_torch_threads: None) -> None:
    result = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"], "-q",
                 *TRAIN[:-2], "--seed", str(2**32 - 1))
    assert result.exit_code == 0, result.stderr
    assert json.loads((subject["out"] / SIDECAR_NAME).read_text())["seed"] == 2**32 - 1


@pytest.mark.parametrize("how", ["same-path", "other-spelling", "symlink", "copy"])
def test_image_as_its_own_prior_is_refused(subject: dict[str, Path], how: str) -> None:
    image = subject["image"]
    prior = {
        "same-path": image,
        "other-spelling": image.parent / "." / image.name,
        "symlink": image.parent / "link.nii.gz",
        "copy": image.parent / "copy.nii.gz",
    }[how]
    if how == "symlink":
        prior.symlink_to(image)
    if how == "copy":
        shutil.copy(image, prior)
    result = run("--prior", prior, "--image", image, "-o", subject["out"], *TRAIN)
    assert_one_line_error(result, "is the image")
    assert "--prior gmm" in error_lines(result)[0]
    assert listing(subject["out"]) == []


def test_missing_image_fails_before_the_cpu_warning(subject: dict[str, Path]) -> None:
    # Without --fast on the CPU the command warns that training is slow; a missing image must
    # be the only line.
    result = run("--prior", "gmm", "--image", subject["image"].parent / "nope.nii.gz",
                 "-o", subject["out"], "--device", "cpu")
    assert_one_line_error(result, "does not exist")
    assert "slow" not in result.stderr


def test_model_folder_is_called_a_folder(subject: dict[str, Path]) -> None:
    folder = subject["image"].parent / "models"
    folder.mkdir()
    result = run("predict", "--model", folder, "--image", subject["image"], "-o", subject["out"])
    assert_one_line_error(result, "is a folder")
    assert "does not exist" not in result.stderr


def test_foreign_model_gives_one_line_without_torch_warning(subject: dict[str, Path]) -> None:
    import pickle

    foreign = subject["image"].parent / "foreign.pkl"
    foreign.write_bytes(pickle.dumps({"state_dict": 1}, protocol=4))  # torch warns on protocol 4
    with pytest.warns(UserWarning):  # guards the case itself: torch does warn on this file
        with pytest.raises(Exception):
            torch.load(foreign, weights_only=True)
    result = run("predict", "--model", foreign, "--image", subject["image"], "-o", subject["out"])
    assert_one_line_error(result, "cannot be read as a cgc_refine model")
    assert "UserWarning" not in result.stderr and "pickle protocol" not in result.stderr


def test_overwrite_message_names_the_cli_flag(subject: dict[str, Path]) -> None:
    (subject["out"] / MASK_NAME).write_bytes(b"keep me")
    result = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"], *TRAIN)
    assert_one_line_error(result, "add --overwrite")
    assert "overwrite=True" not in result.stderr
    sidecar = subject["out"] / "other.json"
    sidecar.write_text("{}")
    cohort = _cohort(subject["out"].parent / "cohort")
    fit = run("fit", "--cohort", cohort, "--image-pattern", "flair.nii.gz", "-o",
              subject["out"] / "other.pt", *TRAIN)
    assert_one_line_error(fit, "add --overwrite")
    assert "overwrite=True" not in fit.stderr


def test_threads_recorded_in_sidecar(subject: dict[str, Path], keep_torch_threads: None) -> None:
    result = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"], "-q",
                 "--threads", "1", *TRAIN)
    assert result.exit_code == 0, result.stderr
    assert json.loads((subject["out"] / SIDECAR_NAME).read_text())["threads"] == 1
    assert torch.get_num_threads() == 1
    bad = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"], "--threads", "0",
              *TRAIN)
    assert_one_line_error(bad, "--threads")


def test_threads_option_on_every_compute_command() -> None:
    for command in ([], ["fit"], ["predict"], ["demo"], ["prior", "gmm"]):
        result = CliRunner().invoke(cli.main, [*command, "--help"])
        assert result.exit_code == 0 and "--threads" in result.output, command


def test_default_threads_in_predict_and_demo_sidecars(
    trained_model: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    keep_torch_threads: None,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run("predict", "--model", trained_model["model"], "--image", trained_model["image"],
                 "-o", tmp_path / "p.nii.gz", "-q", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "p.json").read_text())["threads"] == 1
    demo = run("demo", "--iterations", "1", "--shape", "32", "32", "16", *CROP, "--device", "cpu",
               "-o", tmp_path / "demo", "-q", "--threads", "1")
    assert demo.exit_code == 0, demo.stderr
    demo_sidecar = tmp_path / "demo" / "phantom_FLAIR_label-lesion_mask.json"
    assert json.loads(demo_sidecar.read_text())["threads"] == 1


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
    OSError(28, "No space left on device"),
])
def test_model_write_failure_is_one_line_exit_2(
    subject: dict[str, Path], monkeypatch: pytest.MonkeyPatch, failure: BaseException,
    keep_torch_threads: None,
) -> None:
    def failing_save(obj, handle, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        handle.write(b"partial")
        raise failure

    monkeypatch.setattr(torch, "save", failing_save)
    model = subject["out"] / "model.pt"
    result = run("--prior", "gmm", "--image", subject["image"], "-o", subject["out"],
                 "--save-model", model, "-q", *TRAIN)
    assert_one_line_error(result, "writing model")
    assert listing(subject["out"]) == []  # no mask, sidecar or temporary file either
    cohort = _cohort(subject["out"].parent / "cohort")
    fit = run("fit", "--cohort", cohort, "--image-pattern", "flair.nii.gz", "-o", model,
              "--checkpoint-every", "1", "-q", *TRAIN)
    assert_one_line_error(fit, "writing model")
    assert listing(subject["out"]) == []


def test_checkpoint_write_over_file_size_limit_is_exit_2(tmp_path: Path) -> None:
    """A real EFBIG (ulimit -f) while fit writes its model: exit 2, one line, nothing left."""
    import resource

    exe = _console_script()
    files = write_subject(tmp_path / "in", las_affine())
    out = tmp_path / "out"
    out.mkdir()
    csv_path = tmp_path / "subjects.csv"
    csv_path.write_text(f"subject,image\ns1,{files['image']}\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the model is ~2.4 MB

    done = subprocess.run([exe, "fit", "--csv", str(csv_path), "-o", str(out / "m.pt"), "-q", *TRAIN],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("cgc-refine: error: writing model"), lines
    assert listing(out) == []


# --------------------------------------------------------------------------------------------
# the refinement recipe on the command line
# --------------------------------------------------------------------------------------------


def test_single_subject_records_the_recipe(subject: dict[str, Path]) -> None:
    result = run("--prior", "gmm", "--image", subject["image"], "--cleanup", "multifocal", "--rounds", "2",
                 "--tta", "2", *TRAIN)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((subject["image"].parent / SIDECAR_NAME).read_text())
    refinement = sidecar["refinement"]
    assert refinement["recipe"]["cleanup"] == "multifocal" and refinement["recipe"]["rounds"] == 2
    assert refinement["prior_cleanup"]["pattern"] == "multifocal"
    assert refinement["output_cleanup"]["pattern"] == "multifocal"
    assert len(refinement["rounds"]) == 1 and refinement["rounds"][0]["round"] == 2
    assert 0.0 <= refinement["tta_agreement"] <= 1.0 and 0.0 <= refinement["dice_with_prior"] <= 1.0
    assert sidecar["config"]["tta"] == 2


def test_prior_command_cleanup(subject: dict[str, Path]) -> None:
    target = subject["out"] / "prior.nii.gz"
    result = run("prior", "gmm", "--image", subject["image"], "--brain-mask", subject["brain"],
                 "--cleanup", "focal", "-o", target, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((subject["out"] / "prior.json").read_text())
    assert sidecar["prior"]["cleanup"]["pattern"] == "focal"
    values = np.asanyarray(nib.load(target).dataobj)
    assert int((values >= 0.5).sum()) == sidecar["prior"]["cleanup"]["voxels_after"]


def test_prior_command_cleans_by_default_and_none_keeps_the_raw_prior(subject: dict[str, Path]) -> None:
    # The default (auto) is the clean-up the single-subject command applies to its training target.
    maps = {}
    for tag, extra in (("default", []), ("none", ["--cleanup", "none"])):
        target = subject["out"] / f"{tag}.nii.gz"
        result = run("prior", "gmm", "--image", subject["image"], "--brain-mask", subject["brain"], *extra,
                     "-o", target, "--device", "cpu", "-q")
        assert result.exit_code == 0, result.stderr
        maps[tag] = (np.asanyarray(nib.load(target).dataobj),
                     json.loads((subject["out"] / f"{tag}.json").read_text())["prior"]["cleanup"])
    cleaned, info = maps["default"]
    raw, no_info = maps["none"]
    assert no_info is None and info["pattern"] in ("focal", "multifocal")
    assert info["voxels_before"] == int((raw >= 0.5).sum())
    assert info["voxels_after"] == int((cleaned >= 0.5).sum())


def test_bad_cleanup_pattern_is_a_usage_error(subject: dict[str, Path]) -> None:
    result = run("--prior", "gmm", "--image", subject["image"], "--cleanup", "tumour", *TRAIN)
    assert result.exit_code == 2


# --------------------------------------------------------------------------------------------
# issue 13 item 8: fit --checkpoint-every / --resume
# --------------------------------------------------------------------------------------------

RESUME_TRAIN = ["--fast", "--iterations", "3", *CROP, "--device", "cpu", "--seed", "3"]


def _fit_args(cohort: Path, model: Path) -> list[object]:
    return ["fit", "--cohort", cohort, "--image-pattern", "flair.nii.gz", "--prior-pattern",
            "prior.nii.gz", "--mask-pattern", "brain.nii.gz", "-o", model, *RESUME_TRAIN]


def _interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Raise KeyboardInterrupt in the ``step``-th training step (1-based)."""
    import cgc_refine.training as training

    real = training.training_step
    calls = {"n": 0}

    def interrupting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "training_step", interrupting)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_interrupted_fit_names_its_checkpoint_then_resume_finishes_and_tidies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_torch_threads: None,
) -> None:
    cohort = _cohort(tmp_path / "cohort")
    out = tmp_path / "out"
    out.mkdir()
    model = out / "m.pt"
    checkpoint = out / "m.pt.ckpt"
    with monkeypatch.context() as patch:
        _interrupt_at_step(patch, 3)  # after the checkpoints of iterations 1 and 2
        interrupted = run(*_fit_args(cohort, model), "--checkpoint-every", "1", "--threads", "1")
    assert interrupted.exit_code == 130
    lines = error_lines(interrupted)
    assert lines[-1].startswith("cgc-refine: interrupted")
    assert "no output was written except the training checkpoint" in lines[-1]
    assert str(checkpoint) in lines[-1] and "--resume" in lines[-1]
    assert listing(out) == ["m.pt.ckpt"]  # exactly what the message says

    # predict refuses the unfinished checkpoint and says what it is
    refused = run("predict", "--model", checkpoint, "--image", cohort / "sub-01" / "flair.nii.gz",
                  "-o", tmp_path / "p.nii.gz")
    assert_one_line_error(refused, "is a training checkpoint (iteration 2 of 3)")
    assert "--resume" in error_lines(refused)[0]

    resumed = run(*_fit_args(cohort, model), "--checkpoint-every", "1", "--resume", "--threads", "1")
    assert resumed.exit_code == 0, resumed.stderr
    assert listing(out) == ["m.json", "m.pt"]  # the finished fit removed its checkpoint
    assert json.loads((out / "m.json").read_text())["training"]["resumed_from"] == str(checkpoint)

    # the resumed model is the uninterrupted one, bit for bit
    straight = tmp_path / "straight.pt"
    assert run(*_fit_args(cohort, straight), "--threads", "1", "-q").exit_code == 0
    resumed_w, straight_w = _weights(model), _weights(straight)
    assert resumed_w.keys() == straight_w.keys()
    assert all(torch.equal(resumed_w[k], straight_w[k]) for k in resumed_w)


def test_finished_fit_with_checkpoints_leaves_no_checkpoint(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path / "cohort")
    model = tmp_path / "m.pt"
    result = run(*_fit_args(cohort, model), "--checkpoint-every", "1", "-q")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "m.pt.ckpt").exists() and model.is_file()


def test_resume_without_checkpoint_or_with_another_seed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cohort = _cohort(tmp_path / "cohort")
    out = tmp_path / "out"
    out.mkdir()
    model = out / "m.pt"
    assert_one_line_error(run(*_fit_args(cohort, model), "--resume"), "no checkpoint")
    assert listing(out) == []
    with monkeypatch.context() as patch:
        _interrupt_at_step(patch, 2)
        assert run(*_fit_args(cohort, model), "--checkpoint-every", "1").exit_code == 130
    other_seed = run(*_fit_args(cohort, model), "--resume", "--seed", "4")
    assert_one_line_error(other_seed, "--seed 3")
    assert listing(out) == ["m.pt.ckpt"]


def test_predict_accepts_a_complete_checkpoint_with_a_warning(subject: dict[str, Path]) -> None:
    """A checkpoint written at the last iteration holds a finished model: used, and said."""
    from cgc_refine.io import load_volume
    from cgc_refine.refiner import Refiner

    volume = load_volume(subject["image"])
    prior = np.asanyarray(nib.load(str(subject["prior"])).dataobj)
    checkpoint = subject["out"] / "m.pt.ckpt"
    config = RefinerConfig.fast(iterations=2, crop_size=(16, 16, 16))
    Refiner([prior], config=config, device="cpu", random_state=0).fit(
        [volume], checkpoint_path=checkpoint, checkpoint_every=2)  # the API keeps it
    assert checkpoint_facts(checkpoint)["complete"]
    result = run("predict", "--model", checkpoint, "--image", subject["image"],
                 "-o", subject["out"] / "p.nii.gz")
    assert result.exit_code == 0, result.stderr
    assert "training checkpoint of a finished training (iteration 2 of 2)" in result.stderr


# --------------------------------------------------------------------------------------------
# issue 13 item 14: progress without a terminal, one summary line per single-subject run
# --------------------------------------------------------------------------------------------


class _FakeClock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_log_progress_every_tenth_with_loss_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    lines = cli.console._LogProgress("training", "iteration", clock=_FakeClock(1.0))  # 1 s per iteration
    for iteration in range(1, 101):
        lines.update(iteration, 100, ", loss 0.5000")
    out = capsys.readouterr().err.splitlines()
    assert len(out) == 10  # 10 %, 20 %, ..., 100 %
    assert out[0] == ("cgc-refine: training: iteration 10/100 (10%), loss 0.5000, 9.0 s elapsed, "
                      "ETA 1 min 30 s")
    assert out[-1].startswith("cgc-refine: training: iteration 100/100 (100%)")
    assert "ETA" not in out[-1]


def test_log_progress_at_least_every_30_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    lines = cli.console._LogProgress("training", "iteration", clock=_FakeClock(7.0))  # 7 s per iteration
    for iteration in range(1, 51):  # a tenth is 100 iterations: only the clock triggers
        lines.update(iteration, 1000)
    out = capsys.readouterr().err.splitlines()
    assert len(out) == 9  # iterations 6, 11, ..., 46: 35 s apart (>= 30 s)
    assert out[0].startswith("cgc-refine: training: iteration 6/1000 (0%), 35.0 s elapsed, ETA ")
    # a second self-training round restarts the count and says so
    lines.update(1, 1000)
    lines.update(200, 1000)
    assert "training (round 2): iteration 200/1000 (20%)" in capsys.readouterr().err


def test_inference_log_progress_is_time_based_only(capsys: pytest.CaptureFixture[str]) -> None:
    lines = cli.console._LogProgress("inference", "window", every_tenth=False, clock=_FakeClock(1.0))
    for done in range(1, 11):
        lines.update(done, 10)
    assert capsys.readouterr().err == ""  # 10 s in all: nothing to report
    slow = cli.console._LogProgress("inference", "window", every_tenth=False, clock=_FakeClock(40.0))
    slow.update(1, 4)
    slow.update(2, 4)
    assert "inference: window 2/4 (50%)" in capsys.readouterr().err


def test_duration_text() -> None:
    assert cli.console.duration(4.25) == "4.2 s"
    assert cli.console.duration(125) == "2 min 05 s"
    assert cli.console.duration(3720) == "1 h 02 min"


def test_summary_line_text() -> None:
    assert cli.console.summary_line(12_500.0, 10_000.0, 166.0) == (
        "done: lesion volume 12.50 ml (prior 10.00 ml: +2.50 ml, +25%), in 2 min 46 s")
    assert cli.console.summary_line(800.0, None, 3.0) == "done: lesion volume 0.80 ml, in 3.0 s"


def test_single_subject_without_terminal_logs_progress_and_ends_with_summary(
    subject: dict[str, Path],
) -> None:
    result = run("--prior", subject["prior"], "--image", subject["image"], "-o", subject["out"],
                 "--brain-mask", subject["brain"], *TRAIN)
    assert result.exit_code == 0, result.stderr
    assert "cgc-refine: training: iteration 1/1 (100%), loss " in result.stderr
    last = result.stdout.strip().splitlines()[-1]
    sidecar = json.loads((subject["out"] / SIDECAR_NAME).read_text())
    lesion_ml = sidecar["lesion"]["volume_mm3"] / 1000.0
    assert last.startswith(f"done: lesion volume {lesion_ml:.2f} ml (prior ")
    assert " ml, " in last and "%), in " in last
    # -q: neither progress lines nor the summary
    quiet = run("--prior", subject["prior"], "--image", subject["image"], "-o", subject["out"],
                "--brain-mask", subject["brain"], "--overwrite", "-q", *TRAIN)
    assert quiet.exit_code == 0 and quiet.stdout == "" and "training:" not in quiet.stderr


def test_predict_ends_with_summary(trained_model: dict[str, Path], tmp_path: Path) -> None:
    result = run("predict", "--model", trained_model["model"], "--image", trained_model["image"],
                 "-o", tmp_path / "p.nii.gz", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("done: lesion volume ") and " ml, in " in last


# --------------------------------------------------------------------------------------------
# issue 13 item 2: a prior saved as uint8 0-255, in percent, or in [-1, 1]
# --------------------------------------------------------------------------------------------


def test_uint8_prior_is_read_as_probability_and_said_at_normal_verbosity(
    subject: dict[str, Path],
) -> None:
    prior = np.asanyarray(nib.load(str(subject["prior"])).dataobj).astype(np.float64)
    affine = nib.load(str(subject["prior"])).affine
    stored = _write_nifti(subject["image"].parent / "prior_u8.nii.gz",
                          np.round(prior * 255).astype(np.uint8), affine)
    result = run("--prior", stored, "--image", subject["image"], "--brain-mask", subject["brain"],
                 "-o", subject["out"], *TRAIN)
    assert result.exit_code == 0, result.stderr
    assert "warning: " in result.stderr and "inferred from its values: probability-255" in result.stderr
    assert "prior (read as probability-255): " in result.stdout
    sidecar = json.loads((subject["out"] / SIDECAR_NAME).read_text())
    assert sidecar["prior"]["params"]["scale"] == 255.0
    brain = np.asanyarray(nib.load(str(subject["brain"])).dataobj) > 0
    assert sidecar["prior"]["foreground_voxels"] == int((prior[brain] >= 0.5).sum())  # not the brain


def test_minus_one_to_one_prior_is_refused_with_prior_kind_hint(subject: dict[str, Path]) -> None:
    prior = np.asanyarray(nib.load(str(subject["prior"])).dataobj).astype(np.float32)
    signed = _write_nifti(subject["image"].parent / "signed.nii.gz", 2.0 * prior - 1.0,
                          nib.load(str(subject["prior"])).affine)
    result = run("--prior", signed, "--image", subject["image"], "-o", subject["out"], *TRAIN)
    assert_one_line_error(result, "--prior-kind")
    assert listing(subject["out"]) == []
