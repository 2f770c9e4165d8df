"""``cgc-refine --image FOLDER`` / ``--bids DATASET`` and ``predict`` over folders (tiny phantoms,
one training step, CPU)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import cgc_refine.cli as cli
import cgc_refine.workflow as workflow
from cgc_refine._version import __version__
from cgc_refine.exceptions import InvalidImageError
from cgc_refine.io import save_array
from cgc_refine.phantom import make_phantom, noisy_prior

SHAPE = (32, 32, 16)
CROP = ["--crop-size", "16", "16", "16"]  # hidden option: tiny training crops keep tests fast
TRAIN = ["--fast", "--iterations", "1", *CROP, "--device", "cpu", "--seed", "3"]
LAS = np.diag([-1.2, 1.0, 2.0, 1.0])
MASK = "label-lesion_mask"


def run(*args: object) -> Any:
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def write_image(path: Path, *, affine: np.ndarray | None = None, seed: int = 0,
                prior: bool = False) -> Path:
    """A tiny phantom image at ``path`` (and, with ``prior``, ``<stem>_prior.nii.gz`` beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(SHAPE, affine=affine, seed=seed)
    save_array(phantom.volume.data[0], phantom.volume, path, np.float32)
    if prior:
        noisy = noisy_prior(phantom.truth, phantom.brain, flip_fraction=0.05, seed=seed)
        save_array(noisy, phantom.volume, path.with_name(path.name.replace(".nii.gz", "_prior.nii.gz")),
                   np.float32)
    return path


def bids_tree(root: Path) -> Path:
    """sub-01 (no session) and sub-02/ses-01 (LAS), each with a FLAIR; sub-01 also has a T1w."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.8.0"}))
    write_image(root / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz", seed=1)
    write_image(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", seed=2)
    write_image(root / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_FLAIR.nii.gz", affine=LAS, seed=3)
    return root


def tree(folder: Path) -> list[str]:
    """Every file under ``folder``, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def summary_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def error_lines(result: Any) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("cgc-refine: error:")]


# --------------------------------------------------------------------------------------------
# BIDS
# --------------------------------------------------------------------------------------------


def test_bids_dataset_to_derivatives(tmp_path: Path) -> None:
    root = bids_tree(tmp_path / "ds")
    raw = tree(root)
    result = run("--prior", "gmm", "--bids", root, *TRAIN)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[1/2] sub-01: ok, lesion ") and "ml vs prior" in lines[0]
    assert lines[1].startswith("[2/2] sub-02_ses-01: ok, lesion ")
    assert "2 subject(s): 2 ok, 0 failed, 0 skipped" in result.stdout
    deriv = root / "derivatives" / "cgc_refine"
    assert lines[-1] == f"wrote {deriv / 'cgc_refine_summary.tsv'}"
    assert tree(root) == sorted(raw + [  # the raw tree is untouched; all outputs in derivatives
        f"derivatives/cgc_refine/{name}" for name in (
            "cgc_refine_summary.tsv", "dataset_description.json",
            f"sub-01/anat/sub-01_{MASK}.json", f"sub-01/anat/sub-01_{MASK}.nii.gz",
            f"sub-02/ses-01/anat/sub-02_ses-01_{MASK}.json",
            f"sub-02/ses-01/anat/sub-02_ses-01_{MASK}.nii.gz")])

    source = root / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_FLAIR.nii.gz"
    mask = nib.load(str(deriv / "sub-02" / "ses-01" / "anat" / f"sub-02_ses-01_{MASK}.nii.gz"))
    assert mask.shape == SHAPE and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, nib.load(str(source)).affine, atol=1e-5)
    sidecar = json.loads((deriv / "sub-02" / "ses-01" / "anat" / f"sub-02_ses-01_{MASK}.json").read_text())
    assert sidecar["Type"] == "Lesion"
    assert sidecar["Sources"] == ["bids:raw:sub-02/ses-01/anat/sub-02_ses-01_FLAIR.nii.gz"]
    assert list(sidecar)[:7] == ["cgc_refine_version", "command", "command_line", "created", "python",
                                 "Type", "Sources"]
    assert sidecar["command"] == "segment" and sidecar["prior"]["name"] == "gmm"
    assert sidecar["inputs"]["images"] == [str(source.resolve())]

    description = json.loads((deriv / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"] >= "1.8.0"
    assert description["GeneratedBy"][0] == {**description["GeneratedBy"][0], "Name": "cgc_refine",
                                             "Version": __version__}
    assert description["DatasetLinks"] == {"raw": "../.."}
    rows = summary_rows(deriv / "cgc_refine_summary.tsv")
    assert [(r["subject"], r["status"]) for r in rows] == [("sub-01", "ok"), ("sub-02_ses-01", "ok")]
    assert float(rows[0]["lesion_ml"]) == pytest.approx(
        json.loads((deriv / "sub-01" / "anat" / f"sub-01_{MASK}.json").read_text())["lesion"]["volume_mm3"]
        / 1000.0, abs=1e-4)

    again = run("--prior", "gmm", "--bids", root, *TRAIN)  # outputs exist: refused before any work
    assert again.exit_code == 2 and len(error_lines(again)) == 1
    assert "--skip-existing" in error_lines(again)[0]
    skipped = run("--prior", "gmm", "--bids", root, "--skip-existing", "--participant", "02", *TRAIN)
    assert skipped.exit_code == 0, skipped.stderr
    assert skipped.stdout.startswith("[1/1] sub-02_ses-01: skipped")


def test_bids_options_suffix_filter_and_output_dir(tmp_path: Path) -> None:
    root = bids_tree(tmp_path / "ds")
    out = tmp_path / "deriv"
    result = run("--prior", "gmm", "--bids", root, "--bids-suffix", "T1w", "--output-dir", out,
                 "--participant", "01", "--save-proba", "-q", *TRAIN)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # -q: no lines, no table
    assert tree(out) == ["cgc_refine_summary.tsv", "dataset_description.json",
                         f"sub-01/anat/sub-01_{MASK}.json", f"sub-01/anat/sub-01_{MASK}.nii.gz",
                         "sub-01/anat/sub-01_label-lesion_probseg.nii.gz"]
    assert not (root / "derivatives").exists()
    bad = run("--prior", "gmm", "--bids", root, "--bids-filter", "acq3D", *TRAIN)
    assert bad.exit_code == 2 and "KEY-LABEL" in error_lines(bad)[0]


def test_bids_priors_and_brain_masks_from_derivatives(tmp_path: Path) -> None:
    root = bids_tree(tmp_path / "ds")
    priors, masks = root / "derivatives" / "vae", tmp_path / "hdbet"
    for entities, affine, seed in (("sub-01", None, 1), ("sub-02_ses-01", LAS, 3)):
        anat = Path(*(f"{k}-{v}" for k, v in (e.split("-") for e in entities.split("_"))), "anat")
        phantom = make_phantom(SHAPE, affine=affine, seed=seed)
        noisy = noisy_prior(phantom.truth, phantom.brain, flip_fraction=0.05, seed=seed)
        (priors / anat).mkdir(parents=True)
        save_array(noisy, phantom.volume, priors / anat / f"{entities}_label-lesion_probseg.nii.gz",
                   np.float32)
        (masks / anat).mkdir(parents=True)
        save_array(phantom.brain.astype(np.uint8), phantom.volume,
                   masks / anat / f"{entities}_desc-brain_mask.nii.gz", np.uint8)
    result = run("--bids", root, "--prior-dir", priors, "--brain-mask-dir", masks, *TRAIN)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((root / "derivatives" / "cgc_refine" / "sub-01" / "anat" /
                          f"sub-01_{MASK}.json").read_text())
    assert sidecar["prior"]["path"] == str((priors / "sub-01" / "anat" /
                                            "sub-01_label-lesion_probseg.nii.gz").resolve())
    assert sidecar["inputs"]["brain_mask"].endswith("sub-01_desc-brain_mask.nii.gz")
    assert sidecar["Sources"][:2] == [
        "bids:raw:sub-01/anat/sub-01_FLAIR.nii.gz",
        "bids:raw:derivatives/vae/sub-01/anat/sub-01_label-lesion_probseg.nii.gz"]
    both = run("--prior", "gmm", "--bids", root, "--prior-dir", priors, "--overwrite", *TRAIN)
    assert both.exit_code == 2 and "drop --prior gmm" in error_lines(both)[0]


# --------------------------------------------------------------------------------------------
# Plain folders
# --------------------------------------------------------------------------------------------


def test_plain_folder_with_own_priors(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for seed, name in enumerate(("a", "b")):
        write_image(folder / f"{name}.nii.gz", seed=seed, prior=True)
    out = tmp_path / "out"
    result = run("--image", folder, "--output-dir", out, "--prior-kind", "probability", *TRAIN)
    assert result.exit_code == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:2]] == ["[1/2] a", "[2/2] b"]
    assert tree(out) == ["a_label-lesion_mask.json", "a_label-lesion_mask.nii.gz",
                         "b_label-lesion_mask.json", "b_label-lesion_mask.nii.gz", "cgc_refine_summary.tsv"]
    sidecar = json.loads((out / "b_label-lesion_mask.json").read_text())
    assert sidecar["prior"]["path"] == str((folder / "b_prior.nii.gz").resolve())
    assert sidecar["prior"]["kind"] == "probability" and "Type" not in sidecar

    (folder / "b_prior.nii.gz").unlink()
    missing = run("--image", folder, "--output-dir", tmp_path / "other", *TRAIN)
    assert missing.exit_code == 2 and "no prior file for b" in error_lines(missing)[0]


def test_plain_folder_builtin_prior_beside_the_images(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_image(folder / "a.nii.gz", seed=0)
    write_image(folder / "b.nii.gz", seed=1)
    result = run("--prior", "gmm", "--image", folder, *TRAIN)
    assert result.exit_code == 0, result.stderr
    assert tree(folder) == ["a.nii.gz", "a_label-lesion_mask.json", "a_label-lesion_mask.nii.gz",
                            "b.nii.gz", "b_label-lesion_mask.json", "b_label-lesion_mask.nii.gz",
                            "cgc_refine_summary.tsv"]


def _failing_folder(tmp_path: Path) -> Path:
    """Subject ``a`` is a constant image (refused when read), ``b`` a phantom."""
    folder = tmp_path / "in"
    folder.mkdir()
    phantom = make_phantom(SHAPE, seed=0)
    save_array(np.full(SHAPE, 5.0, dtype=np.float32), phantom.volume, folder / "a.nii.gz", np.float32)
    write_image(folder / "b.nii.gz", seed=1)
    return folder


def test_failing_subject_stops_the_run(tmp_path: Path) -> None:
    folder = _failing_folder(tmp_path)
    out = tmp_path / "out"
    result = run("--prior", "gmm", "--image", folder, "--output-dir", out, *TRAIN)
    assert result.exit_code == 2
    assert len(error_lines(result)) == 1 and "constant" in error_lines(result)[0]
    assert "[1/1]" not in result.stdout and result.stdout.startswith("[1/2] a: failed")
    assert "1 subject(s): 0 ok, 1 failed" in result.stdout
    assert not (out / "b_label-lesion_mask.nii.gz").exists()


def test_failing_subject_with_keep_going(tmp_path: Path) -> None:
    folder = _failing_folder(tmp_path)
    out = tmp_path / "out"
    result = run("--prior", "gmm", "--image", folder, "--output-dir", out, "--keep-going", *TRAIN)
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"cgc-refine: error: 1 of 2 subject(s) failed (a); their errors are in the summary above "
        f"and in {out / 'cgc_refine_summary.tsv'}"]
    assert "[2/2] b: ok" in result.stdout and "2 subject(s): 1 ok, 1 failed" in result.stdout
    assert (out / "b_label-lesion_mask.nii.gz").is_file()
    assert not (out / "a_label-lesion_mask.nii.gz").exists()
    rows = summary_rows(out / "cgc_refine_summary.tsv")
    assert [r["status"] for r in rows] == ["failed", "ok"] and "constant" in rows[0]["error"]


def test_unexpected_failures_and_interrupts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    for name in ("a", "b"):
        write_image(folder / f"{name}.nii.gz")

    def broken(images: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(workflow, "refine_subject", broken)
    result = run("--prior", "gmm", "--image", folder, "--keep-going", *TRAIN)
    assert result.exit_code == 1  # not an anticipated error
    assert error_lines(result)[-1].startswith("cgc-refine: error: 2 of 2 subject(s) failed (a, b)")
    assert "RuntimeError: boom" in result.stdout

    def interrupted(images: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(images[0]).name.startswith("b"):
            raise KeyboardInterrupt
        return SimpleNamespace(lesion_ml=1.0, prior_ml=None)

    monkeypatch.setattr(workflow, "refine_subject", interrupted)
    stopped = run("--prior", "gmm", "--image", folder, "--overwrite", *TRAIN)
    assert stopped.exit_code == 130
    assert "interrupted; the outputs of the 1 subject(s) finished before are kept" in stopped.stderr
    assert "no output was written" not in stopped.stderr


@pytest.mark.parametrize(("args", "phrase"), [
    (["--prior", "PRIOR", "--image", "FOLDER"], "is one image's prior"),
    (["--prior", "gmm", "--image", "FOLDER", "-o", "x.nii.gz"], "--output-dir"),
    (["--prior", "gmm", "--image", "FOLDER", "--truth", "IMAGE"], "evaluate"),
    (["--prior", "gmm", "--image", "FOLDER", "--image", "IMAGE"], "goes alone"),
    (["--prior", "gmm", "--image", "IMAGE", "--keep-going"], "--keep-going goes with a folder"),
    (["--prior", "gmm", "--image", "FOLDER", "--bids-suffix", "T2w"], "goes with --bids"),
    (["--prior", "gmm", "--bids", "FOLDER", "--image", "IMAGE"], "not both"),
    (["--prior", "gmm", "--bids", "FOLDER"], "not a BIDS dataset root"),
    (["predict", "--model", "m.pt", "--image", "IMAGE", "--output-dir", "FOLDER"], "goes with a folder"),
    (["predict", "--model", "m.pt"], "missing option --image"),
])
def test_usage_errors(tmp_path: Path, args: list[str], phrase: str) -> None:
    folder = tmp_path / "in"
    image = write_image(folder / "a.nii.gz", prior=True)
    names = {"FOLDER": folder, "IMAGE": image, "PRIOR": folder / "a_prior.nii.gz"}
    result = run(*(names.get(a, a) for a in args), *([] if args[0] == "predict" else TRAIN))
    assert result.exit_code == 2, result.stdout
    assert len(error_lines(result)) == 1 and phrase in error_lines(result)[0], result.stderr
    assert tree(folder) == ["a.nii.gz", "a_prior.nii.gz"]


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


def test_predict_over_a_folder_and_a_bids_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cgc_refine.workflow import models as model_files

    model = tmp_path / "model.pt"
    fitted = run("--prior", "gmm", "--image", write_image(tmp_path / "train" / "t.nii.gz"),
                 "--save-model", model, "-q", *TRAIN)
    assert fitted.exit_code == 0, fitted.stderr
    folder = tmp_path / "in"
    write_image(folder / "s1" / "FLAIR.nii.gz", seed=1)
    write_image(folder / "s2" / "FLAIR.nii.gz", seed=2)
    out = tmp_path / "out"
    reads: list[Any] = []
    load_model = model_files.load_model
    monkeypatch.setattr(model_files, "load_model", lambda *a, **k: reads.append(a) or load_model(*a, **k))
    result = run("predict", "--model", model, "--image", folder, "--output-dir", out, "--device", "cpu",
                 "--prior", "gmm")
    assert result.exit_code == 0, result.stderr
    assert len(reads) == 1  # one model file read for both subjects
    assert result.stdout.startswith("[1/2] s1: ok, lesion ")
    assert tree(out) == ["cgc_refine_summary.tsv", "s1/FLAIR_label-lesion_mask.json",
                         "s1/FLAIR_label-lesion_mask.nii.gz", "s2/FLAIR_label-lesion_mask.json",
                         "s2/FLAIR_label-lesion_mask.nii.gz"]
    sidecar = json.loads((out / "s2" / "FLAIR_label-lesion_mask.json").read_text())
    assert sidecar["command"] == "predict" and sidecar["inputs"]["model"] == str(model.resolve())
    assert sidecar["prior"]["name"] == "gmm"  # each subject's own built-in prior

    root = bids_tree(tmp_path / "ds")
    on_bids = run("predict", "--model", model, "--bids", root, "--participant", "sub-02", "-q")
    assert on_bids.exit_code == 0, on_bids.stderr
    deriv = root / "derivatives" / "cgc_refine"
    sidecar = json.loads((deriv / "sub-02" / "ses-01" / "anat" / f"sub-02_ses-01_{MASK}.json").read_text())
    assert sidecar["Type"] == "Lesion" and sidecar["command"] == "predict"
    assert (deriv / "dataset_description.json").is_file()


def test_single_file_runs_are_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain --image file still goes to the single-subject job, without dataset lines."""
    image = write_image(tmp_path / "flair.nii.gz")
    calls: list[Any] = []

    def fake(images: Any, prior: Any, outputs: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((images, outputs))
        raise InvalidImageError("stop here")

    monkeypatch.setattr(workflow, "refine_subject", fake)
    result = run("--prior", "gmm", "--image", image, *TRAIN)
    assert result.exit_code == 2 and error_lines(result) == ["cgc-refine: error: stop here"]
    assert result.stdout == "" and os.listdir(tmp_path) == ["flair.nii.gz"]
    assert calls[0][1].mask == tmp_path / f"flair_{MASK}.nii.gz" and calls[0][1].sidecar_fields is None


def test_a_folder_run_on_a_non_zero_torchrun_rank_prints_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 of a torchrun launch trains (the job returns None there) but must not print a
    line per subject nor write a second summary table beside rank 0's."""
    from cgc_refine import distributed

    folder = tmp_path / "in"
    write_image(folder / "a.nii.gz", seed=1)
    write_image(folder / "b.nii.gz", seed=2)
    calls: list[Any] = []
    monkeypatch.setattr(workflow, "refine_subject", lambda images, *a, **k: calls.append(images))
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    result = run("--prior", "gmm", "--image", folder, *TRAIN)
    assert result.exit_code == 0, result.stderr
    assert len(calls) == 2  # both subjects were run
    assert result.stdout == "" and tree(folder) == ["a.nii.gz", "b.nii.gz"]
