"""Cohorts: subjects found in a folder by file-name patterns, or listed in a CSV file.

A subject is a name plus paths: its image(s) (the lesion-bright modality first), and
optionally a prior map, a brain mask and a ground-truth mask (used only for evaluation).
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .exceptions import CGCRefineError, InvalidImageError

__all__ = ["Subject", "find_subjects", "read_subjects_csv", "PRESETS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subject:
    """Paths that belong to one subject.

    Attributes
    ----------
    name : str
        Subject identifier (the folder name in a folder cohort).
    images : tuple of Path
        Image files, lesion-bright modality first.
    prior, brain_mask, truth : Path or None
        Optional prior map, brain mask and ground-truth mask.
    """

    name: str
    images: tuple[Path, ...]
    prior: Path | None = None
    brain_mask: Path | None = None
    truth: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)


#: File patterns of the layouts the project's benchmarks use.
PRESETS: dict[str, dict[str, object]] = {
    "brats-deepmedic": {
        "images": ("Flair_subtrMeanDivStd.nii.gz",),
        "brain_mask": "brainmask.nii.gz",
        "truth": "OTMultiClass.nii.gz",
    },
    "wmh-vbnet": {
        "images": ("t2flair-stripped.nii.gz",),
        "truth": "gt.nii.gz",
        "extra": {"seg": "seg.nii.gz"},
    },
}


def _match_one(folder: Path, pattern: str | None) -> Path | None:
    if not pattern:
        return None
    hits = sorted(p for p in folder.iterdir() if fnmatch.fnmatch(p.name, pattern))
    if len(hits) > 1:
        raise CGCRefineError(
            f"pattern {pattern!r} matches {len(hits)} files in {folder}; make it specific"
        )
    return hits[0] if hits else None


def find_subjects(
    root: str | os.PathLike[str],
    images: Sequence[str],
    *,
    prior: str | None = None,
    brain_mask: str | None = None,
    truth: str | None = None,
    extra: dict[str, str] | None = None,
) -> list[Subject]:
    """Find subjects as sub-folders of ``root`` holding files that match the patterns.

    Parameters
    ----------
    root : path
        Folder with one sub-folder per subject.
    images : sequence of str
        One glob pattern per modality (``fnmatch`` syntax), lesion-bright modality first.
    prior, brain_mask, truth : str, optional
        Glob patterns of the optional per-subject files.
    extra : dict, optional
        Further named patterns (kept in ``Subject.extra``).

    Returns
    -------
    list of Subject
        Sorted by name; sub-folders lacking an image are skipped with a log message.
    """
    base = Path(root)
    if not base.is_dir():
        raise InvalidImageError(f"cohort folder {base} does not exist; check the path")
    subjects = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        found = [_match_one(folder, pattern) for pattern in images]
        if any(path is None for path in found):
            logger.info("skipping %s: no file matches %s", folder, list(images))
            continue
        subjects.append(
            Subject(
                name=folder.name,
                images=tuple(found),  # type: ignore[arg-type]
                prior=_match_one(folder, prior),
                brain_mask=_match_one(folder, brain_mask),
                truth=_match_one(folder, truth),
                extra={k: p for k, v in (extra or {}).items() if (p := _match_one(folder, v))},
            )
        )
    return subjects


def read_subjects_csv(path: str | os.PathLike[str]) -> list[Subject]:
    """Read subjects from a CSV with a header row.

    Columns: ``subject`` (name), ``image`` (or ``image1``, ``image2``, ... for several
    modalities, lesion-bright first), and optionally ``prior``, ``brain_mask``, ``truth``.
    Relative paths are taken relative to the CSV's folder.
    """
    csv_path = Path(path)
    folder = csv_path.parent
    subjects = []
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        image_columns = ["image"] if "image" in fields else sorted(
            (f for f in fields if f.startswith("image")), key=lambda f: int(f[5:] or 0)
        )
        if not image_columns or "subject" not in fields:
            raise CGCRefineError(
                f"{csv_path} needs a header with 'subject' and 'image' (or image1, image2...) columns"
            )
        for row in reader:
            def resolve(value: str | None) -> Path | None:
                if not value:
                    return None
                candidate = Path(value)
                return candidate if candidate.is_absolute() else folder / candidate

            subjects.append(
                Subject(
                    name=row["subject"],
                    images=tuple(p for c in image_columns if (p := resolve(row.get(c)))),
                    prior=resolve(row.get("prior")),
                    brain_mask=resolve(row.get("brain_mask")),
                    truth=resolve(row.get("truth")),
                )
            )
    return subjects
