"""Writing one result: output names, the all-or-nothing output set, the sidecar and the report.

Every command and workflow writes its files through :func:`output_transaction` (they replace
the previous outputs together or not at all), describes them in one JSON sidecar built by
:func:`sidecar_record` (one schema for every command) and, for a segmented subject, ends with
:func:`finish_subject`: score against a ground truth when there is one, draw the report when
asked, write everything. Heavy modules (numpy, nibabel, matplotlib) are imported on use.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._utils import OutputSet, check_writable_target, jsonable, write_text_atomic
from .._version import __version__
from ..exceptions import OutputNotWritableError

__all__ = [
    "CT_WINDOW",
    "SIDECAR_SECTIONS",
    "OutputTransaction",
    "ReportSpec",
    "absolute",
    "check_outputs",
    "dice_line",
    "dump_json",
    "finish_subject",
    "is_nifti_name",
    "output_transaction",
    "probseg_path_for",
    "report_numbers",
    "report_paths_for",
    "score",
    "sidecar_path_for",
    "sidecar_record",
    "strip_nifti",
    "training_section",
    "voxel_volume_mm3",
]

#: Brain window (HU) of the report montage for CT.
CT_WINDOW = (0.0, 80.0)

# --------------------------------------------------------------------------------------------
# Output names
# --------------------------------------------------------------------------------------------


def strip_nifti(name: str) -> tuple[str, str]:
    """Split ``name`` into its stem and ``.nii.gz``/``.nii`` extension (``""`` when neither)."""
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return name, ""


def is_nifti_name(path: Path) -> bool:
    """Whether the file name ends in ``.nii.gz`` or ``.nii`` (after a non-empty stem)."""
    stem, ext = strip_nifti(path.name)
    return bool(ext) and bool(stem)


def sidecar_path_for(path: Path) -> Path:
    """``<stem>.json`` next to a NIfTI file or a model file (``model.json`` for ``model.pt``);
    ``<name>.json`` when that would be the file itself (``model.json`` -> ``model.json.json``)."""
    stem, ext = strip_nifti(path.name)
    if not ext:
        stem = path.stem if path.suffix else path.name
    sidecar = path.with_name(stem + ".json")
    return path.with_name(path.name + ".json") if sidecar == path else sidecar


def probseg_path_for(mask_path: Path) -> Path:
    """The probability map next to a mask: ``..._mask.nii.gz`` -> ``..._probseg.nii.gz``."""
    stem, ext = strip_nifti(mask_path.name)
    stem = stem[: -len("_mask")] if stem.endswith("_mask") else stem
    return mask_path.with_name(stem + "_probseg" + (ext or ".nii.gz"))


def report_paths_for(mask_path: Path) -> tuple[Path, Path]:
    """``<mask stem>_report.png`` and ``<mask stem>_report.html`` next to the mask."""
    stem, _ = strip_nifti(mask_path.name)
    return mask_path.with_name(stem + "_report.png"), mask_path.with_name(stem + "_report.html")


def _real(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except OSError:
        return Path(os.path.abspath(path))


def check_outputs(
    nifti: Sequence[Path], plain: Sequence[tuple[Path, str]], inputs: Sequence[Path], overwrite: bool
) -> None:
    """Check every output before any compute: writable, not existing, distinct, not an input.

    Parameters
    ----------
    nifti : sequence of Path
        NIfTI outputs (checked by :func:`cgc_refine.io.check_output_path`).
    plain : sequence of (Path, str)
        Other outputs (JSON, CSV, models, pictures) and what each is, for the messages.
    inputs : sequence of Path
        The input files, none of which may be overwritten.
    overwrite : bool
        Whether existing outputs may be replaced.

    Raises
    ------
    OutputNotWritableError, OutputExistsError
    """
    from ..io import check_output_path

    resolved_inputs = {_real(p) for p in inputs}
    seen: set[Path] = set()
    for path in [*nifti, *(p for p, _ in plain)]:
        key = _real(path)
        if key in resolved_inputs:
            raise OutputNotWritableError(
                f"output '{path}' is one of the input files; choose another output path (-o)"
            )
        if key in seen:
            raise OutputNotWritableError(
                f"two outputs would be written to '{path}'; choose another output path (-o)"
            )
        seen.add(key)
    for path in nifti:
        check_output_path(path, overwrite=overwrite)
    for path, what in plain:
        check_writable_target(path, overwrite, what=what)


# --------------------------------------------------------------------------------------------
# All-or-nothing writing
# --------------------------------------------------------------------------------------------


class OutputTransaction:
    """The outputs of one command, all or nothing.

    Inside :func:`output_transaction` the writers leave hidden temporary files with
    ``outputs`` (a :class:`cgc_refine._utils.OutputSet`); they replace the previous outputs
    together, under a lock, only once every file is written. ``written`` lists the outputs in
    the order they were written, for the messages.
    """

    def __init__(self, overwrite: bool) -> None:
        self.overwrite = overwrite
        self.written: list[Path] = []
        self.outputs = OutputSet(overwrite)
        self._in_place: list[Path] = []  # written directly by a writer that does not stage

    def add(self, path: Path) -> Path:
        """Record a written output (returned unchanged)."""
        self.written.append(Path(path))
        if Path(path) not in self.outputs.destinations:
            self._in_place.append(Path(path))
        return Path(path)

    def write_json(self, path: Path, payload: dict[str, Any]) -> Path:
        """Write ``payload`` as indented strict JSON to ``path`` and record it."""
        return self.add(write_text_atomic(path, dump_json(payload), overwrite=self.overwrite,
                                          what="sidecar"))

    def rollback(self) -> None:
        """Remove the temporaries, and any file a writer wrote in place instead of staging it."""
        self.outputs.discard()
        for path in reversed(self._in_place):
            with contextlib.suppress(OSError):
                path.unlink()
        self.written, self._in_place = [], []


@contextlib.contextmanager
def output_transaction(overwrite: bool) -> Iterator[OutputTransaction]:
    """Collect the outputs written in the block; commit them together when it ends without error."""
    tx = OutputTransaction(overwrite)
    try:
        with tx.outputs.collect():
            yield tx
        tx.outputs.commit()  # on failure it restores the previous outputs itself
    except BaseException:
        tx.rollback()
        raise


def dump_json(payload: dict[str, Any]) -> str:
    """Strict JSON (NaN becomes null), indented, with a final newline."""
    return json.dumps(jsonable(payload, strict=True), indent=2, allow_nan=False) + "\n"


# --------------------------------------------------------------------------------------------
# The sidecar schema
# --------------------------------------------------------------------------------------------

#: Sections a sidecar may hold after the common head, in this order.
SIDECAR_SECTIONS = (
    "inputs", "outputs", "prior", "model", "modality", "seed", "device", "threads", "n_channels",
    "threshold", "min_size_mm3", "config", "training", "lesion", "refinement", "evaluation",
    "dice", "distributed", "timings",
)


def absolute(path: Any) -> str | None:
    """The absolute path of ``path`` as text (None stays None)."""
    return None if path is None else os.path.abspath(os.fspath(path))


def sidecar_record(command: str, command_line: Sequence[str] = (), **sections: Any) -> dict[str, Any]:
    """The JSON sidecar of one command's result: the one schema every command writes.

    A common head (``cgc_refine_version``, ``command``, ``command_line``, ``created``,
    ``python``) followed by the sections given, in the order of :data:`SIDECAR_SECTIONS`
    (sections that are None are left out).

    Parameters
    ----------
    command : str
        ``"segment"``, ``"predict"``, ``"prior"``, ``"fit"`` or ``"demo"``.
    command_line : sequence of str
        The command line that produced the result (empty from Python).
    **sections
        Keys of :data:`SIDECAR_SECTIONS`: ``inputs`` and ``outputs`` (absolute paths),
        ``prior`` (provenance and diagnostics), ``config`` (:meth:`RefinerConfig.to_dict`),
        ``training`` (iterations, crop, window, history), ``lesion`` (voxels, volume),
        ``evaluation`` (scores against a truth), ``timings`` (seconds per stage)...

    Raises
    ------
    KeyError
        For a section name outside :data:`SIDECAR_SECTIONS`.
    """
    unknown = set(sections) - set(SIDECAR_SECTIONS)
    if unknown:
        raise KeyError(f"unknown sidecar sections {sorted(unknown)}")
    record: dict[str, Any] = {
        "cgc_refine_version": __version__,
        "command": command,
        "command_line": list(command_line),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }
    for name in SIDECAR_SECTIONS:
        if sections.get(name) is not None:
            record[name] = sections[name]
    record.setdefault("timings", {})
    return record


def _in_schema_order(record: dict[str, Any]) -> None:
    """Put sections added after :func:`sidecar_record` (``evaluation``) in their place."""
    for name in SIDECAR_SECTIONS:
        if name in record:
            record[name] = record.pop(name)


def training_section(refiner: Any) -> dict[str, Any]:
    """The ``training`` section of a fitted refiner: iterations, crop, window and history."""
    window = getattr(refiner, "window_size_", refiner.crop_size_)  # older models: the crop
    return {"n_iter": int(refiner.n_iter_), "crop_size": list(refiner.crop_size_),
            "inference_window": [int(v) for v in window], "history": refiner.history_}


def voxel_volume_mm3(volume: Any) -> float:
    """The volume of one voxel of ``volume`` (a :class:`cgc_refine.io.Volume`), in mm^3."""
    import numpy as np

    return float(abs(np.linalg.det(volume.affine[:3, :3])))


# --------------------------------------------------------------------------------------------
# Score, report, write: the end of every segmentation
# --------------------------------------------------------------------------------------------


@dataclass
class ReportSpec:
    """What the optional report of one segmentation shows.

    Parameters
    ----------
    png, html : Path
        The montage and the page.
    title : str
        The page's title.
    settings : dict
        Rows of the report's table after the volumes and scores.
    modality : str
        ``"ct"`` draws the montage in the brain window :data:`CT_WINDOW`.
    """

    png: Path
    html: Path
    title: str
    settings: dict[str, Any]
    modality: str = "mri"


def score(mask: Any, truth: Any, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, sensitivity, precision, HD95 and ASSD of ``mask`` against ``truth``."""
    from ..metrics import evaluate

    return {k: float(v) for k, v in evaluate(mask, truth, spacing=spacing).items()}


def dice_line(evaluation: dict[str, dict[str, float]]) -> str:
    """``Dice against the truth: 0.812`` (``prior 0.700, refined 0.812`` with a prior)."""
    def text(scores: dict[str, float]) -> str:
        value = scores["dice"]
        return "nan" if math.isnan(value) else f"{value:.3f}"

    if "prior" in evaluation:
        return (f"Dice against the truth: prior {text(evaluation['prior'])}, "
                f"refined {text(evaluation['refined'])}")
    return f"Dice against the truth: {text(evaluation['refined'])}"


def report_numbers(
    *, volume: Any, refined: Any, prior: Any | None, truth: Any | None,
    evaluation: dict[str, dict[str, float]] | None, settings: dict[str, Any],
    refinement: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The table of the HTML report: volumes (ml), the label-free refinement facts (change and
    agreement with the prior, TTA consistency, per self-training round), metrics against the
    truth, settings."""
    voxel_ml = voxel_volume_mm3(volume) / 1000.0
    numbers: dict[str, Any] = {
        "voxel size (mm)": " x ".join(f"{s:.3g}" for s in volume.spacing),
        "grid (voxels)": " x ".join(str(s) for s in volume.shape),
    }
    if prior is not None:
        numbers["prior lesion volume (ml, p >= 0.5)"] = int((prior >= 0.5).sum()) * voxel_ml
    numbers["refined lesion volume (ml)"] = int(refined.sum()) * voxel_ml
    numbers["refined lesion voxels"] = int(refined.sum())
    numbers.update(_refinement_numbers(refinement or {}))
    if truth is not None and evaluation is not None:
        numbers["ground-truth lesion volume (ml)"] = int(truth.sum()) * voxel_ml
        for which in ("refined", "prior"):
            scores = evaluation.get(which)
            if scores is None:
                continue
            for key, label in (("dice", "Dice"), ("sensitivity", "sensitivity"),
                               ("precision", "precision")):
                numbers[f"{label} ({which})"] = scores[key]
            numbers[f"HD95 ({which}, mm)"] = scores["hd95"]
    numbers.update(settings)
    return numbers


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _refinement_numbers(refinement: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's label-free refinement facts as rows of the report's table."""
    rows: dict[str, Any] = {}
    if "voxels_changed_vs_prior" in refinement:
        rows["voxels changed vs the prior (label-free)"] = refinement["voxels_changed_vs_prior"]
    if refinement.get("dice_with_prior") is not None:
        rows["Dice with the prior (label-free)"] = refinement["dice_with_prior"]
    if refinement.get("tta_agreement") is not None:
        rows["TTA agreement (label-free)"] = refinement["tta_agreement"]
    for record in refinement.get("rounds") or []:
        name = f"round {record['round']} target"
        rows[f"{name}: voxels changed"] = sum(record["voxels_changed"])
        rows[f"{name}: Dice with the previous target"] = _mean(record["dice_with_previous_target"])
        rows[f"{name}: TTA agreement"] = _mean(record["tta_agreement"])
    if refinement.get("guard"):
        rows["collapse guard"] = refinement["guard"]
    return rows


def _write_report(tx: OutputTransaction, spec: ReportSpec, numbers: dict[str, Any], *, volume: Any,
                  refined: Any, prior: Any | None, truth: Any | None, sidecar: dict[str, Any]) -> None:
    """Draw the montage and write the HTML page next to it (inside the output transaction)."""
    from ..report import render_montage, write_html_report

    window = CT_WINDOW if spec.modality == "ct" else None
    tx.add(render_montage(volume, spec.png, prior=prior, refined=refined, truth=truth,
                          spacing=volume.spacing, title=spec.title, window=window,
                          overwrite=tx.overwrite))
    shown = {k: v for k, v in sidecar.items() if k not in ("training", "timings")}
    if "training" in sidecar:  # the per-step history would swamp the page
        shown["training"] = {k: v for k, v in sidecar["training"].items() if k != "history"}
    tx.add(write_html_report(spec.html, title=spec.title, numbers=numbers, image_name=spec.png.name,
                             sidecar=shown, overwrite=tx.overwrite))


def finish_subject(
    *, volume: Any, mask: Any, probability: Any | None, sidecar: dict[str, Any], sidecar_path: Path,
    mask_path: Path, overwrite: bool, started: float, probability_path: Path | None = None,
    prior: Any | None = None, truth: Any | None = None, report: ReportSpec | None = None,
    before_mask: Callable[[OutputTransaction], None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> tuple[list[Path], dict[str, dict[str, float]] | None]:
    """Score, report and write one segmented subject: the end of every segmentation.

    Scores ``mask`` (and the prior, when given) against ``truth`` into the sidecar's
    ``evaluation``, then writes, all or nothing: whatever ``before_mask`` writes (a model,
    the phantom's inputs), the mask, the probability map, the report and, last, the sidecar.

    Parameters
    ----------
    volume : Volume
        The image: grid of every output.
    mask, probability : numpy.ndarray
        The refined mask and its probability map.
    sidecar : dict
        From :func:`sidecar_record`; ``evaluation``, report outputs and timings are added.
    sidecar_path, mask_path, probability_path : Path
        Where to write (no probability map when ``probability_path`` is None).
    overwrite : bool
        Replace existing outputs.
    started : float
        ``time.perf_counter()`` at the start of the job, for ``timings.total_s``.
    prior, truth : numpy.ndarray, optional
        The prior probability map and the ground-truth mask, for scores and the report.
    report : ReportSpec, optional
        Draw the report.
    before_mask : callable, optional
        Called with the transaction before the mask is written, to write more outputs.
    announce : callable, optional
        Called with the ``Dice against the truth: ...`` line when there is a truth.

    Returns
    -------
    written : list of Path
        The outputs, in the order they were written.
    evaluation : dict or None
        ``{"refined": scores, "prior": scores}`` (``"prior"`` when a prior was given).
    """
    evaluation = None
    if truth is not None:
        evaluation = {"refined": score(mask, truth, volume.spacing)}
        if prior is not None:
            evaluation["prior"] = score(prior >= 0.5, truth, volume.spacing)
        sidecar["evaluation"] = evaluation
        if announce is not None:
            announce(dice_line(evaluation))
    if report is not None:
        sidecar["outputs"].update(report_png=absolute(report.png), report_html=absolute(report.html))
    timings = sidecar.setdefault("timings", {})
    tick = time.perf_counter()
    with output_transaction(overwrite) as tx:
        if before_mask is not None:
            before_mask(tx)
        from ..io import save_mask, save_probability_map

        tx.add(save_mask(mask, volume, mask_path, overwrite=overwrite))
        if probability_path is not None:
            tx.add(save_probability_map(probability, volume, probability_path, overwrite=overwrite))
        if report is not None:
            numbers = report_numbers(volume=volume, refined=mask, prior=prior, truth=truth,
                                     evaluation=evaluation, settings=report.settings,
                                     refinement=sidecar.get("refinement"))
            _write_report(tx, report, numbers, volume=volume, refined=mask, prior=prior,
                          truth=truth, sidecar=sidecar)
        timings["write_s"] = time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - started
        _in_schema_order(sidecar)
        tx.write_json(sidecar_path, sidecar)
    return tx.written, evaluation
