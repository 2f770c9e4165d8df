"""Datasets: discovery in plain folders and BIDS trees, output paths, the dataset runner."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from cgc_refine._version import __version__
from cgc_refine.datasets import (
    DatasetSubject,
    OutputPaths,
    bids_sidecar_fields,
    find_bids_subjects,
    find_folder_subjects,
    output_paths,
    parse_bids_name,
    plan_outputs,
    run_dataset,
    write_dataset_description,
)
from cgc_refine.exceptions import (
    CGCRefineError,
    DatasetError,
    InvalidImageError,
    InvalidPriorError,
    OutputExistsError,
)

RAS = np.diag([1.0, 1.0, 1.0, 1.0])
LAS = np.diag([-1.0, 1.0, 1.0, 1.0])


def _nifti(path: Path, affine: np.ndarray = RAS, value: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full((4, 4, 4), value, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _bids_tree(root: Path) -> Path:
    """sub-01 (no session, RAS) and sub-02/ses-01 (acq-3D, LAS), each with FLAIR and T1w."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.8.0"}))
    _nifti(root / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz")
    _nifti(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _nifti(root / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_acq-3D_FLAIR.nii.gz", LAS)
    _nifti(root / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_T1w.nii", LAS)
    return root


def _stub(calls: list[str], fail: str | None = None) -> Any:
    """A run_one that writes a mask (on the image grid) and its sidecar where it is told."""

    def run_one(subject: DatasetSubject, outputs: OutputPaths) -> dict[str, float]:
        calls.append(subject.id)
        if subject.id == fail:
            raise InvalidImageError(f"image of {subject.id} is constant; check the file")
        image = nib.load(str(subject.image))
        mask = np.zeros(image.shape, dtype=np.uint8)
        mask[1:3, 1:3, 1:3] = 1
        nib.save(nib.Nifti1Image(mask, image.affine), str(outputs.mask))
        outputs.sidecar.write_text(json.dumps({"lesion_voxels": int(mask.sum())}))
        return {"lesion_ml": 0.008, "prior_ml": 0.004}

    return run_one


# --------------------------------------------------------------------------------------------
# BIDS
# --------------------------------------------------------------------------------------------


def test_parse_bids_name() -> None:
    assert parse_bids_name("sub-02_ses-01_acq-3D_FLAIR.nii.gz") == (
        (("sub", "02"), ("ses", "01"), ("acq", "3D")), "FLAIR")
    assert parse_bids_name("sub-01_FLAIR.json") is None
    assert parse_bids_name("flair.nii.gz") is None
    assert parse_bids_name("sub-01_acq_FLAIR.nii.gz") is None


def test_bids_discovery_derivatives_and_description(tmp_path: Path) -> None:
    root = _bids_tree(tmp_path / "ds")
    subjects = find_bids_subjects(root, extra_suffixes=("T1w",))
    assert [s.id for s in subjects] == ["sub-01", "sub-02_ses-01_acq-3D"]
    one, two = subjects
    assert (one.subject, one.session, two.subject, two.session) == ("01", None, "02", "01")
    assert [p.name for p in two.images] == ["sub-02_ses-01_acq-3D_FLAIR.nii.gz", "sub-02_ses-01_T1w.nii"]
    assert one.prior is None and one.brain_mask is None and one.layout == "bids"

    deriv = root / "derivatives" / "cgc_refine"
    plan = plan_outputs(subjects)
    assert plan["sub-01"].mask == deriv / "sub-01" / "anat" / "sub-01_label-lesion_mask.nii.gz"
    assert plan["sub-01"].probseg == deriv / "sub-01" / "anat" / "sub-01_label-lesion_probseg.nii.gz"
    assert plan["sub-01"].sidecar == deriv / "sub-01" / "anat" / "sub-01_label-lesion_mask.json"
    folder = deriv / "sub-02" / "ses-01" / "anat"
    assert plan["sub-02_ses-01_acq-3D"].mask == folder / "sub-02_ses-01_acq-3D_label-lesion_mask.nii.gz"

    calls: list[str] = []
    echoed: list[str] = []
    summary = run_dataset(subjects, _stub(calls), echo=echoed.append)
    assert calls == ["sub-01", "sub-02_ses-01_acq-3D"]
    assert [r.status for r in summary.rows] == ["ok", "ok"] and summary.n_failed == 0
    assert summary.rows[0].lesion_ml == pytest.approx(0.008)
    assert summary.rows[0].change_ml == pytest.approx(0.004)
    assert echoed[0].startswith("[1/2] sub-01: ok, lesion 0.01 ml") and echoed[1].startswith("[2/2]")
    assert "sub-02_ses-01_acq-3D" in summary.table and "2 subject(s): 2 ok" in summary.table
    for outputs in plan.values():
        assert outputs.mask.is_file() and outputs.sidecar.is_file()
    mask = nib.load(str(plan["sub-02_ses-01_acq-3D"].mask))
    assert nib.aff2axcodes(mask.affine) == ("L", "A", "S")
    assert summary.tsv == deriv / "cgc_refine_summary.tsv"
    lines = summary.tsv.read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["subject", "status", "lesion_ml"] and len(lines) == 3

    description = json.loads((deriv / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["BIDSVersion"] >= "1.8.0" and description["Name"]
    assert description["GeneratedBy"][0]["Name"] == "cgc_refine"
    assert description["GeneratedBy"][0]["Version"] == __version__
    assert description["DatasetLinks"] == {"raw": "../.."}
    fields = bids_sidecar_fields(two)
    assert fields["Type"] == "Lesion"
    assert fields["Sources"][0] == "bids:raw:sub-02/ses-01/anat/sub-02_ses-01_acq-3D_FLAIR.nii.gz"


def test_bids_rerun_keeps_description_and_refuses_or_skips_outputs(tmp_path: Path) -> None:
    root = _bids_tree(tmp_path / "ds")
    subjects = find_bids_subjects(root)
    run_dataset(subjects, _stub([]), summary_tsv=False)
    description = root / "derivatives" / "cgc_refine" / "dataset_description.json"
    before = description.read_text()
    calls: list[str] = []
    with pytest.raises(OutputExistsError, match="--overwrite .* --skip-existing"):
        run_dataset(subjects, _stub(calls))
    assert calls == []
    summary = run_dataset(subjects, _stub(calls), skip_existing=True)
    assert calls == [] and [r.status for r in summary.rows] == ["skipped", "skipped"]
    again = run_dataset(subjects, _stub(calls), skip_existing=True)
    assert summary.tsv and again.tsv and again.tsv != summary.tsv  # the first table is kept
    assert again.tsv.name.startswith("cgc_refine_summary-")
    run_dataset(subjects, _stub(calls), overwrite=True)
    assert calls == ["sub-01", "sub-02_ses-01_acq-3D"] and description.read_text() == before
    assert len(list(description.parent.glob("cgc_refine_summary*.tsv"))) == 2


def test_foreign_dataset_description_is_refused(tmp_path: Path) -> None:
    deriv = tmp_path / "deriv"
    deriv.mkdir()
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "BIDSVersion": "1.8.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fmriprep"}]}))
    with pytest.raises(OutputExistsError, match="generated by fmriprep, not cgc_refine.*--output-dir"):
        write_dataset_description(deriv)
    (deriv / "dataset_description.json").write_text("{not json")
    with pytest.raises(OutputExistsError, match="cannot be read"):
        write_dataset_description(deriv)


def test_run_dataset_keep_going_records_the_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    subjects = find_bids_subjects(_bids_tree(tmp_path / "ds"))
    calls: list[str] = []
    with caplog.at_level(logging.INFO, logger="cgc_refine"):
        summary = run_dataset(subjects, _stub(calls, fail="sub-01"), keep_going=True)
    assert calls == ["sub-01", "sub-02_ses-01_acq-3D"]
    assert [r.status for r in summary.rows] == ["failed", "ok"] and summary.n_failed == 1
    assert summary.rows[0].error == "image of sub-01 is constant; check the file"
    assert "[1/2] sub-01: failed (image of sub-01 is constant" in caplog.text
    assert "1 ok, 1 failed" in summary.table

    calls.clear()
    with pytest.raises(InvalidImageError, match="constant"):
        run_dataset(subjects, _stub(calls, fail="sub-01"), overwrite=True)
    assert calls == ["sub-01"]  # stopped at the failing subject


def test_bids_prior_and_mask_from_derivatives(tmp_path: Path) -> None:
    root = _bids_tree(tmp_path / "ds")
    priors = root / "derivatives" / "vae"
    _nifti(priors / "sub-01" / "anat" / "sub-01_label-lesion_probseg.nii.gz")
    _nifti(priors / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz")
    _nifti(priors / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_acq-3D_label-lesion_probseg.nii.gz")
    subjects = find_bids_subjects(root, prior_dir=priors)
    assert [s.prior.name for s in subjects] == [  # type: ignore[union-attr]
        "sub-01_label-lesion_probseg.nii.gz", "sub-02_ses-01_acq-3D_label-lesion_probseg.nii.gz"]
    with pytest.raises(InvalidImageError, match="no brain mask for sub-02_ses-01_acq-3D"):
        find_bids_subjects(root, mask_dir=priors, mask_pattern="*_desc-brain_mask.nii*")
    with pytest.raises(InvalidPriorError, match="2 prior files match sub-01 .*make the prior pattern specific"):
        find_bids_subjects(root, prior_dir=priors, prior_pattern="*.nii.gz")


def test_bids_filters_participants_and_suffix(tmp_path: Path) -> None:
    root = _bids_tree(tmp_path / "ds")
    assert [s.id for s in find_bids_subjects(root, participants=["sub-02"])] == ["sub-02_ses-01_acq-3D"]
    assert [s.id for s in find_bids_subjects(root, suffix="T1w")] == ["sub-01", "sub-02_ses-01"]
    with pytest.raises(DatasetError, match="participant.*sub-09 not found"):
        find_bids_subjects(root, participants=["09"])
    with pytest.raises(InvalidImageError, match="sub-01 .*lack.*acq-3D"):
        find_bids_subjects(root, filters={"acq": "3D"})
    assert [s.id for s in find_bids_subjects(root, filters={"acq": "3D"}, allow_missing=True)] == [
        "sub-02_ses-01_acq-3D"]


# --------------------------------------------------------------------------------------------
# Plain folders
# --------------------------------------------------------------------------------------------


def test_flat_folder_discovery_and_outputs(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _nifti(folder / "a.nii.gz")
    _nifti(folder / "a_brainmask.nii.gz")
    _nifti(folder / "b.nii")
    _nifti(folder / "b_prior.nii.gz")
    _nifti(folder / "a_label-lesion_mask.nii.gz")  # an earlier output: not a subject
    (folder / "notes.txt").write_text("x")
    subjects = find_folder_subjects(folder)
    assert [(s.id, s.layout) for s in subjects] == [("a", "flat"), ("b", "flat")]
    a, b = subjects
    assert a.brain_mask == folder / "a_brainmask.nii.gz" and a.prior is None
    assert b.prior == folder / "b_prior.nii.gz" and b.images == (folder / "b.nii",)
    assert output_paths(a).mask == folder / "a_label-lesion_mask.nii.gz"
    assert output_paths(b, output_dir=tmp_path / "out").probseg == tmp_path / "out" / "b_label-lesion_probseg.nii.gz"
    summary = run_dataset(subjects, _stub([]), output_dir=tmp_path / "out")
    assert (tmp_path / "out" / "a_label-lesion_mask.nii.gz").is_file()
    assert summary.tsv == tmp_path / "out" / "cgc_refine_summary.tsv"
    assert not (tmp_path / "out" / "dataset_description.json").exists()


def test_flat_folder_with_modality_suffixes(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for name in ("p1_flair", "p1_t1", "p2_flair", "p2_t1", "p2_prior"):
        _nifti(folder / f"{name}.nii.gz")
    subjects = find_folder_subjects(folder, image_suffix="_flair", extra_suffixes=("_t1",))
    assert [s.id for s in subjects] == ["p1", "p2"]
    assert [p.name for p in subjects[1].images] == ["p2_flair.nii.gz", "p2_t1.nii.gz"]
    assert subjects[1].prior is not None and subjects[0].prior is None
    (folder / "p1_t1.nii.gz").unlink()
    with pytest.raises(InvalidImageError, match="'p1' .*lacks its _t1 image"):
        find_folder_subjects(folder, image_suffix="_flair", extra_suffixes=("_t1",))


def test_subfolder_layout(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _nifti(folder / "s1" / "FLAIR.nii.gz")
    _nifti(folder / "s1" / "prior.nii.gz")
    _nifti(folder / "s2" / "FLAIR.nii.gz")
    _nifti(folder / "s2" / "s2_brainmask.nii.gz")
    subjects = find_folder_subjects(folder)
    assert [(s.id, s.layout) for s in subjects] == [("s1", "folders"), ("s2", "folders")]
    assert subjects[0].prior == folder / "s1" / "prior.nii.gz"
    assert subjects[1].brain_mask == folder / "s2" / "s2_brainmask.nii.gz"
    plan = plan_outputs(subjects, output_dir=tmp_path / "out")
    assert plan["s1"].mask == tmp_path / "out" / "s1" / "FLAIR_label-lesion_mask.nii.gz"
    assert plan_outputs(subjects)["s2"].mask == folder / "s2" / "FLAIR_label-lesion_mask.nii.gz"
    run_dataset(subjects, _stub([]), output_dir=tmp_path / "out")
    assert (tmp_path / "out" / "s2" / "FLAIR_label-lesion_mask.json").is_file()

    def job(subject: DatasetSubject, outputs: OutputPaths) -> SimpleNamespace:
        assert outputs.folder.is_dir()
        return SimpleNamespace(lesion_ml=1.5, prior_ml=None)  # like workflow.SubjectResult

    summary = run_dataset(subjects, job, output_dir=tmp_path / "other", summary_tsv=False)
    assert [(r.lesion_ml, r.change_ml) for r in summary.rows] == [(1.5, None), (1.5, None)]
    assert summary.tsv is None and "1.50" in summary.table


# --------------------------------------------------------------------------------------------
# Errors: each a CGCRefineError (exit 2 on the command line) that says what to do
# --------------------------------------------------------------------------------------------


def test_empty_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        find_folder_subjects(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no subject found in .*expected <id>.nii.gz files"):
        find_folder_subjects(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not a BIDS dataset root .*--image <folder>"):
        find_bids_subjects(tmp_path / "empty")
    (tmp_path / "empty" / "sub-01").mkdir()
    with pytest.raises(DatasetError, match="looks like a BIDS dataset: use --bids"):
        find_folder_subjects(tmp_path / "empty")


def test_missing_images_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _nifti(folder / "s1" / "FLAIR.nii.gz")
    (folder / "s2").mkdir()
    (folder / "s2" / "readme.txt").write_text("no image yet")
    _nifti(folder / "s2" / "prior.nii.gz")
    with pytest.raises(InvalidImageError, match="'.*s2' must hold exactly one image .*found none"):
        find_folder_subjects(folder)
    _nifti(folder / "s2" / "FLAIR.nii.gz")
    _nifti(folder / "s2" / "T1.nii.gz")
    with pytest.raises(InvalidImageError, match="found FLAIR.nii.gz, T1.nii.gz: .*image suffix"):
        find_folder_subjects(folder)

    root = _bids_tree(tmp_path / "ds")
    _nifti(root / "sub-03" / "anat" / "sub-03_T1w.nii.gz")
    with pytest.raises(InvalidImageError, match="sub-03 in .* lack.*anat/\\*_FLAIR.nii\\[.gz\\]"):
        find_bids_subjects(root)
    assert len(find_bids_subjects(root, allow_missing=True)) == 2
    with pytest.raises(DatasetError, match="no sub-\\*/.*_PD.nii.*suffixes present: FLAIR, T1w.*--bids-suffix"):
        find_bids_subjects(root, suffix="PD")
    with pytest.raises(InvalidImageError, match="cannot pick the T2w image"):
        find_bids_subjects(root, extra_suffixes=("T2w",), allow_missing=True)


def test_colliding_ids_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _nifti(folder / "a.nii")
    _nifti(folder / "a.nii.gz")
    with pytest.raises(DatasetError, match="subject id 'a' is given twice .*a.nii and a.nii.gz"):
        find_folder_subjects(folder)

    orphan = tmp_path / "orphan"
    _nifti(orphan / "a.nii.gz")
    _nifti(orphan / "c_prior.nii.gz")
    with pytest.raises(DatasetError, match="c_prior.nii.gz is a prior file but there is no image 'c.nii.gz'"):
        find_folder_subjects(orphan)

    root = _bids_tree(tmp_path / "ds")
    _nifti(root / "sub-01" / "anat" / "sub-01_FLAIR.nii")
    with pytest.raises(DatasetError, match="'sub-01' and 'sub-01' .*collide"):
        find_bids_subjects(root)

    same_name = [DatasetSubject(id=k, images=(tmp_path / k / "FLAIR.nii.gz",), layout="flat", root=tmp_path)
                 for k in ("x", "y")]
    with pytest.raises(DatasetError, match="'x' and 'y' would both write .*distinct names"):
        plan_outputs(same_name, output_dir=tmp_path / "out")
    for error in (DatasetError, InvalidImageError, InvalidPriorError, OutputExistsError):
        assert issubclass(error, CGCRefineError)


def test_output_names_agree_with_the_single_subject_job(tmp_path: Path) -> None:
    results = pytest.importorskip("cgc_refine.workflow.results")
    subject = find_folder_subjects(_nifti(tmp_path / "in" / "sub-01_FLAIR.nii.gz").parent)[0]
    paths = output_paths(subject)
    assert paths.mask == tmp_path / "in" / "sub-01_FLAIR_label-lesion_mask.nii.gz"
    assert paths.probseg == results.probseg_path_for(paths.mask)
    assert paths.sidecar == results.sidecar_path_for(paths.mask)
    assert (paths.report_png, paths.report_html) == results.report_paths_for(paths.mask)
