"""Output paths of dataset jobs (plain folders, BIDS derivatives) and the derivatives'
``dataset_description.json`` (rules: see :mod:`cgc_refine.datasets`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._utils import atomic_write
from .._version import __version__
from ..exceptions import DatasetError, OutputExistsError
from ._discovery import PIPELINE_NAME, DatasetSubject, PathLike, _listing, _split_nifti

logger = logging.getLogger(__name__)

BIDS_VERSION = "1.8.0"
MASK_SUFFIX = "label-lesion_mask"
PROBSEG_SUFFIX = "label-lesion_probseg"


@dataclass(frozen=True)
class OutputPaths:
    """Where one job writes: the mask, its probability map, its JSON sidecar, the report."""

    mask: Path
    probseg: Path
    sidecar: Path
    report_png: Path
    report_html: Path

    @property
    def folder(self) -> Path:
        """The folder of the outputs (created by :func:`run_dataset` before the job runs)."""
        return self.mask.parent


def bids_derivatives_dir(root: PathLike, pipeline: str = PIPELINE_NAME) -> Path:
    """``<root>/derivatives/<pipeline>``: the default output folder of a BIDS dataset."""
    return Path(root) / "derivatives" / pipeline


def _outputs_for_stem(folder: Path, stem: str) -> OutputPaths:
    mask_stem = f"{stem}_{MASK_SUFFIX}"
    return OutputPaths(
        mask=folder / f"{mask_stem}.nii.gz",
        probseg=folder / f"{stem}_{PROBSEG_SUFFIX}.nii.gz",
        sidecar=folder / f"{mask_stem}.json",
        report_png=folder / f"{mask_stem}_report.png",
        report_html=folder / f"{mask_stem}_report.html",
    )


def output_paths(subject: DatasetSubject, *, output_dir: PathLike | None = None) -> OutputPaths:
    """The output files of one subject (names as the single-subject command writes them).

    Parameters
    ----------
    subject : DatasetSubject
        A subject found by :func:`find_bids_subjects` or :func:`find_folder_subjects`.
    output_dir : path, optional
        BIDS: the derivatives pipeline folder (default ``<root>/derivatives/cgc_refine``).
        Plain folder: the output folder (default: beside each image); a folder-layout subject
        writes into ``output_dir/<id>/``.

    Returns
    -------
    OutputPaths
    """
    if subject.layout == "bids":
        base = Path(output_dir) if output_dir is not None else bids_derivatives_dir(subject.root)
        folder = base / f"sub-{subject.subject}"
        if subject.session:
            folder = folder / f"ses-{subject.session}"
        return _outputs_for_stem(folder / subject.image.parent.name, subject.id)
    stem = _split_nifti(subject.image.name)
    image_stem = stem[0] if stem else subject.image.name
    if output_dir is None:
        folder = subject.image.parent
    elif subject.layout == "folders":
        folder = Path(output_dir) / subject.id
    else:
        folder = Path(output_dir)
    return _outputs_for_stem(folder, image_stem)


def plan_outputs(
    subjects: Sequence[DatasetSubject], *, output_dir: PathLike | None = None
) -> dict[str, OutputPaths]:
    """Outputs of every subject, keyed by id; refuses plans where two subjects share a file.

    Raises
    ------
    DatasetError
        Two subjects would write the same mask (e.g. equal image names in one output folder).
    """
    plan: dict[str, OutputPaths] = {}
    owners: dict[str, str] = {}
    for subject in subjects:
        outputs = output_paths(subject, output_dir=output_dir)
        key = os.path.normcase(os.path.abspath(outputs.mask)).casefold()
        if key in owners or subject.id in plan:
            raise DatasetError(
                f"subjects '{owners.get(key, subject.id)}' and '{subject.id}' would both write "
                f"{outputs.mask}; give their images distinct names or write beside the inputs"
            )
        owners[key] = subject.id
        plan[subject.id] = outputs
    return plan


def dataset_description(source_root: PathLike | None, derivatives_dir: PathLike) -> dict[str, Any]:
    """The ``dataset_description.json`` of the derivatives folder (BIDS 1.8 derivative).

    ``DatasetLinks.raw`` points from ``derivatives_dir`` to ``source_root`` (a relative path when
    possible), which is what the ``bids:raw:`` URIs of the sidecars' ``Sources`` refer to.
    """
    description: dict[str, Any] = {
        "Name": "cgc_refine lesion segmentations",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": PIPELINE_NAME,
            "Version": __version__,
            "Description": "Unsupervised lesion segmentation: a prior refined by a CGC-regularised 3D U-Net",
        }],
    }
    if source_root is not None:
        try:
            link = Path(os.path.relpath(Path(source_root).resolve(), Path(derivatives_dir).resolve()))
            description["DatasetLinks"] = {"raw": link.as_posix()}
        except ValueError:  # another drive (Windows)
            description["DatasetLinks"] = {"raw": Path(source_root).resolve().as_uri()}
    return description


def _compatible(existing: Mapping[str, Any]) -> str | None:
    """Why an existing description cannot be shared with this pipeline, or None."""
    if existing.get("DatasetType") != "derivative":
        return f"its DatasetType is {existing.get('DatasetType')!r}, not 'derivative'"
    names = [g.get("Name") for g in existing.get("GeneratedBy") or [] if isinstance(g, Mapping)]
    if PIPELINE_NAME not in names:
        return f"it was generated by {_listing(names) or 'an unnamed pipeline'}, not {PIPELINE_NAME}"
    return None


def write_dataset_description(derivatives_dir: PathLike, *, source_root: PathLike | None = None) -> Path:
    """Write ``dataset_description.json`` once; keep a compatible existing one.

    Parameters
    ----------
    derivatives_dir : path
        The derivatives pipeline folder (created when missing).
    source_root : path, optional
        The raw dataset, linked as ``raw`` in ``DatasetLinks``.

    Returns
    -------
    pathlib.Path
        The description's path.

    Raises
    ------
    OutputExistsError
        A description of another pipeline (or of a raw dataset) is there, or it is unreadable.
    """
    folder = Path(derivatives_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset_description.json"
    if path.exists():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
            reason = _compatible(existing) if isinstance(existing, dict) else "it is not a JSON object"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = f"it cannot be read ({type(exc).__name__})"
        if reason:
            raise OutputExistsError(
                f"{path} exists and {reason}; write the outputs to another folder (--output-dir) "
                "or remove that file"
            )
        versions = {g.get("Version") for g in existing["GeneratedBy"]
                    if isinstance(g, Mapping) and g.get("Name") == PIPELINE_NAME}
        if __version__ not in versions:
            logger.warning("%s names cgc_refine %s; this is %s (kept as it is)", path,
                           _listing(sorted(map(str, versions))), __version__)
        return path
    text = json.dumps(dataset_description(source_root, folder), indent=2) + "\n"
    try:
        atomic_write(path, lambda handle: handle.write(text), overwrite=False, binary=False,
                     what="dataset description")
    except OutputExistsError:  # another run wrote it meanwhile
        logger.debug("%s appeared while writing; keeping it", path)
    return path


def bids_sidecar_fields(subject: DatasetSubject) -> dict[str, Any]:
    """BIDS mask metadata for a subject's mask sidecar: ``Type`` and ``Sources`` (bids URIs).

    Empty for plain-folder subjects. The URIs name files relative to the raw dataset, which
    ``DatasetLinks.raw`` of :func:`dataset_description` locates.
    """
    if subject.layout != "bids":
        return {}
    sources = []
    for path in (*subject.images, subject.prior, subject.brain_mask):
        if path is None:
            continue
        try:
            sources.append(f"bids:raw:{path.relative_to(subject.root).as_posix()}")
        except ValueError:  # a derivative elsewhere
            sources.append(path.resolve().as_uri())
    return {"Type": "Lesion", "Sources": sources}

