"""Finding the subjects of a plain folder of NIfTI files or of a BIDS dataset (rules: see
:mod:`cgc_refine.datasets`)."""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..exceptions import DatasetError, InvalidImageError, InvalidPriorError

logger = logging.getLogger(__name__)

#: Name of the derivatives pipeline folder and of ``GeneratedBy``.
PIPELINE_NAME = "cgc_refine"
_OUR_OUTPUT_MARK = "_label-lesion"
_MAX_LISTED = 5

Layout = Literal["bids", "flat", "folders"]
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class DatasetSubject:
    """One job of a dataset: the inputs of one single-subject run.

    Attributes
    ----------
    id : str
        Unique name of the job: the file stem or folder name (plain folder), or the source
        entities (BIDS, e.g. ``sub-01_ses-02`` or ``sub-01_acq-3D``).
    images : tuple of Path
        Image files, lesion-bright modality first (as ``--image`` repeated).
    prior : Path or None
        External prior map of this subject (``--prior FILE``), None for a built-in prior.
    brain_mask : Path or None
        Brain mask (``--brain-mask``), None to derive it from the image.
    subject : str
        Subject label (BIDS label without ``sub-``; the id for a plain folder).
    session : str or None
        BIDS session label without ``ses-``.
    layout : {"bids", "flat", "folders"}
        How the subject was found; decides where its outputs go.
    root : Path
        The dataset folder the subject was found in.
    entities : tuple of (str, str)
        The BIDS entities of the source image in file-name order (empty for a plain folder).
    """

    id: str
    images: tuple[Path, ...]
    prior: Path | None = None
    brain_mask: Path | None = None
    subject: str = ""
    session: str | None = None
    layout: Layout = "flat"
    root: Path = field(default=Path("."))
    entities: tuple[tuple[str, str], ...] = ()

    @property
    def image(self) -> Path:
        """The lesion-bright image (the first of :attr:`images`)."""
        return self.images[0]


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def _split_nifti(name: str) -> tuple[str, str] | None:
    """``(stem, extension)`` of a NIfTI file name, None for other names."""
    lower = name.lower()
    for ext in (".nii.gz", ".nii"):
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    return None


def _nifti_files(folder: Path, *, with_outputs: bool = False) -> list[Path]:
    """Visible NIfTI files of ``folder``, sorted; without earlier outputs of this tool (names
    containing ``_label-lesion``) unless ``with_outputs``."""
    found = []
    for path in sorted(folder.iterdir()):
        parts = _split_nifti(path.name)
        if path.name.startswith(".") or parts is None or not path.is_file():
            continue
        if not with_outputs and _OUR_OUTPUT_MARK in parts[0]:
            logger.debug("ignoring %s: an output of cgc_refine", path)
            continue
        found.append(path)
    return found


def parse_bids_name(name: str) -> tuple[tuple[tuple[str, str], ...], str] | None:
    """Entities and suffix of a BIDS NIfTI file name.

    Parameters
    ----------
    name : str
        A file name such as ``sub-01_ses-02_acq-3D_FLAIR.nii.gz``.

    Returns
    -------
    tuple or None
        ``((("sub", "01"), ("ses", "02"), ("acq", "3D")), "FLAIR")``; None when the name is
        not a NIfTI file, does not start with ``sub-`` or has a part that is not ``key-value``.
    """
    parts = _split_nifti(name)
    if parts is None:
        return None
    *pairs, suffix = parts[0].split("_")
    entities = []
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not key or not value or not value.isalnum():
            return None
        entities.append((key, value))
    if not entities or entities[0][0] != "sub" or not suffix.isalnum():
        return None
    return tuple(entities), suffix


def _listing(items: Iterable[object]) -> str:
    items = [str(item) for item in items]
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


# --------------------------------------------------------------------------------------------
# Plain folders
# --------------------------------------------------------------------------------------------


def looks_like_bids(path: PathLike) -> bool:
    """Whether ``path`` is a folder with a ``dataset_description.json`` or a ``sub-*`` folder."""
    root = Path(path)
    if not root.is_dir():
        return False
    return (root / "dataset_description.json").is_file() or any(
        p.is_dir() and p.name.startswith("sub-") for p in root.iterdir()
    )


def _role_of(stem: str, roles: Mapping[str, str], plain_names: bool) -> tuple[str, str] | None:
    """``(role, subject id)`` of a file stem that ends with a role suffix, else None."""
    for role, suffix in roles.items():
        if suffix and stem.endswith(suffix) and len(stem) > len(suffix):
            return role, stem[: -len(suffix)]
        if plain_names and suffix and stem == suffix.lstrip("_"):
            return role, ""
    return None


def _scan_flat(folder: Path, image_suffix: str, roles: Mapping[str, str], plain_names: bool) -> dict:
    """Group the NIfTI files of one folder by subject id: ``{id: {"image": p, role: p}}``."""
    groups: dict[str, dict[str, Path]] = {}
    claimed: list[tuple[str, str, Path]] = []
    for path in _nifti_files(folder):
        stem = _split_nifti(path.name)[0]  # type: ignore[index]
        role = _role_of(stem, roles, plain_names)
        if role is not None:
            claimed.append((role[0], role[1], path))
            continue
        if image_suffix and not stem.endswith(image_suffix):
            logger.info("ignoring %s: its name does not end in %s.nii[.gz]", path, image_suffix)
            continue
        subject_id = stem[: len(stem) - len(image_suffix)] if image_suffix else stem
        if subject_id in groups:
            raise DatasetError(
                f"subject id '{subject_id}' is given twice in {folder} ({groups[subject_id]['image'].name} "
                f"and {path.name}); keep one of the files (or rename one) and run again"
            )
        groups[subject_id] = {"image": path}
    if plain_names and len(groups) != 1:  # a subject folder without its one image: the caller says so
        return groups
    for role, subject_id, path in claimed:
        # In a subject's own folder every role file belongs to the folder's (single) image.
        key = next(iter(groups)) if plain_names and len(groups) == 1 else subject_id
        if key not in groups:
            raise DatasetError(
                f"{path} is a {role} file but there is no image '{key}{image_suffix}.nii.gz' for "
                f"it in {folder}; rename it to <id>{roles[role]}.nii.gz after its image, or remove it"
            )
        if role in groups[key]:
            raise DatasetError(
                f"subject '{key}' has two {role} files in {folder} ({groups[key][role].name} and "
                f"{path.name}); keep one"
            )
        groups[key][role] = path
    return groups


def _subject_from_group(
    subject_id: str, group: Mapping[str, Path], extra_suffixes: Sequence[str], layout: Layout, root: Path
) -> DatasetSubject:
    missing = [suffix for suffix in extra_suffixes if f"extra{suffix}" not in group]
    if missing:
        raise InvalidImageError(
            f"subject '{subject_id}' in {root} lacks its {_listing(missing)} image "
            f"({subject_id}{missing[0]}.nii.gz); add it, or drop that modality"
        )
    return DatasetSubject(
        id=subject_id,
        images=(group["image"], *(group[f"extra{s}"] for s in extra_suffixes)),
        prior=group.get("prior"),
        brain_mask=group.get("brain mask"),
        subject=subject_id,
        layout=layout,
        root=root,
    )


def find_folder_subjects(
    folder: PathLike,
    *,
    image_suffix: str = "",
    extra_suffixes: Sequence[str] = (),
    prior_suffix: str = "_prior",
    mask_suffix: str = "_brainmask",
) -> list[DatasetSubject]:
    """Find the subjects of a plain folder of NIfTI files (rules in the module docstring).

    Parameters
    ----------
    folder : path
        A folder of ``<id>.nii.gz`` files (flat layout) or of one sub-folder per subject.
    image_suffix : str
        End of the lesion-bright image's stem (e.g. ``"_flair"``); empty: every file that is
        not a prior, mask or extra modality is an image.
    extra_suffixes : sequence of str
        Stem ends of further modalities, in the order the model expects (e.g. ``("_t1",)``).
    prior_suffix, mask_suffix : str
        Stem ends of per-subject prior maps and brain masks.

    Returns
    -------
    list of DatasetSubject
        Sorted by id.

    Raises
    ------
    DatasetError
        The folder is missing or holds no subject, or ids collide.
    InvalidImageError
        A subject folder holds no image or several, or lacks an extra modality.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"input folder '{root}' does not exist or is not a folder; check the path")
    roles = {"prior": prior_suffix, "brain mask": mask_suffix, **{f"extra{s}": s for s in extra_suffixes}}
    if _nifti_files(root):
        groups = _scan_flat(root, image_suffix, roles, plain_names=False)
        subjects = [_subject_from_group(k, g, extra_suffixes, "flat", root) for k, g in groups.items()]
    elif looks_like_bids(root):
        raise DatasetError(f"no NIfTI file in '{root}', which looks like a BIDS dataset: use --bids")
    else:
        subjects = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if sub.name == "derivatives":
                continue
            groups = _scan_flat(sub, image_suffix, roles, plain_names=True)
            if len(groups) != 1:
                found = _listing(g["image"].name for g in groups.values()) or "none"
                raise InvalidImageError(
                    f"subject folder '{sub}' must hold exactly one image{_suffix_hint(image_suffix)}; "
                    f"found {found}: add the image, remove the others, or pass the image suffix "
                    "that tells the image apart"
                )
            group = next(iter(groups.values()))
            subjects.append(_subject_from_group(sub.name, group, extra_suffixes, "folders", root))
    if not subjects:
        raise DatasetError(
            f"no subject found in '{root}': expected <id>{image_suffix}.nii.gz files or one sub-folder "
            "per subject holding one; check the folder"
        )
    _check_unique_ids(subjects, root)
    logger.info("found %d subject(s) in %s", len(subjects), root)
    return sorted(subjects, key=lambda s: s.id)


def _suffix_hint(image_suffix: str) -> str:
    return f" (*{image_suffix}.nii[.gz])" if image_suffix else " (a .nii or .nii.gz file)"


def _check_unique_ids(subjects: Sequence[DatasetSubject], root: Path) -> None:
    """Ids that differ only in case would collide on case-insensitive file systems."""
    seen: dict[str, str] = {}
    for subject in subjects:
        key = subject.id.casefold()
        if key in seen:
            raise DatasetError(
                f"subject ids '{seen[key]}' and '{subject.id}' in {root} collide (they differ only "
                "in letter case or extension, and their outputs would overwrite each other); "
                "rename one of them"
            )
        seen[key] = subject.id


# --------------------------------------------------------------------------------------------
# BIDS datasets
# --------------------------------------------------------------------------------------------


def _anat_folders(
    root: Path, participants: Sequence[str] | None, session: str | None
) -> list[tuple[str, Path]]:
    """``(participant label, anat folder)`` of every subject and session (or only ``session``)."""
    wanted = {p.removeprefix("sub-") for p in participants} if participants else None
    folders = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-")):
        label = sub.name[4:]
        if wanted is not None and label not in wanted:
            continue
        sessions = sorted(p for p in sub.iterdir() if p.is_dir() and p.name.startswith("ses-")
                          and session in (None, p.name[4:]))
        folders += [(label, ses / "anat") for ses in sessions]
        folders.append((label, sub / "anat"))
    if wanted is not None:
        absent = sorted(wanted - {label for label, _ in folders})
        if absent:
            raise DatasetError(
                f"participant(s) {_listing('sub-' + a for a in absent)} not found in {root}; "
                "check the labels (as in the sub-<label> folder names)"
            )
    return folders


def _matches(entities: tuple[tuple[str, str], ...], filters: Mapping[str, str]) -> bool:
    have = dict(entities)
    return all(have.get(key) == value for key, value in filters.items())


def _companion(anat: Path, entities: tuple, suffix: str, source: Path) -> Path:
    """The file with ``suffix`` that goes with ``source``: same entities, else the only one."""
    same = [p for p in _nifti_files(anat) if parse_bids_name(p.name) == (entities, suffix)]
    pool = same or [
        p for p in _nifti_files(anat) if (parsed := parse_bids_name(p.name)) and parsed[1] == suffix
    ]
    if len(pool) != 1:
        found = _listing(p.name for p in pool) or "none"
        raise InvalidImageError(
            f"cannot pick the {suffix} image that goes with {source.name} in {anat} (found {found}); "
            f"give each {suffix} the same entities as its source image, or drop that modality"
        )
    return pool[0]


def _derivative_for(
    base: Path | None, root: Path, anat: Path, entities: tuple, pattern: str, what: str
) -> Path | None:
    """The file of a derivatives folder that belongs to a source with ``entities``."""
    if base is None:
        return None
    folder = base / anat.relative_to(root)
    source = dict(entities)
    hits = []
    if folder.is_dir():
        for path in _nifti_files(folder, with_outputs=True):
            parsed = parse_bids_name(path.name)
            if parsed and source.items() <= dict(parsed[0]).items() and fnmatch.fnmatch(path.name, pattern):
                hits.append(path)
    error = InvalidPriorError if what == "prior" else InvalidImageError
    name = "_".join(f"{k}-{v}" for k, v in entities)
    if not hits:
        raise error(
            f"no {what} for {name} in {folder} (looked for {pattern} with the entities {name}); "
            f"add it, or change the {what} pattern or folder"
        )
    if len(hits) > 1:
        raise error(
            f"{len(hits)} {what} files match {name} in {folder} ({_listing(p.name for p in hits)}); "
            f"make the {what} pattern specific"
        )
    return hits[0]


def _bids_root(root: PathLike) -> Path:
    base = Path(root)
    if not base.is_dir() or not any(p.is_dir() and p.name.startswith("sub-") for p in base.iterdir()):
        raise DatasetError(
            f"'{base}' is not a BIDS dataset root (no sub-<label> folder in it); pass the folder "
            "that holds sub-*/, or use --image <folder> for a plain folder of NIfTI files"
        )
    if not (base / "dataset_description.json").is_file():
        logger.warning("%s has no dataset_description.json; reading it as BIDS anyway", base)
    return base


def find_bids_subjects(
    root: PathLike,
    *,
    suffix: str = "FLAIR",
    extra_suffixes: Sequence[str] = (),
    filters: Mapping[str, str] | None = None,
    participants: Sequence[str] | None = None,
    prior_dir: PathLike | None = None,
    prior_pattern: str = "*_probseg.nii*",
    mask_dir: PathLike | None = None,
    mask_pattern: str = "*_mask.nii*",
    allow_missing: bool = False,
) -> list[DatasetSubject]:
    """Find every ``sub-<label>[/ses-<label>]/anat/*_<suffix>.nii[.gz]`` of a BIDS dataset.

    Parameters
    ----------
    root : path
        The BIDS dataset root (the folder holding ``sub-*``).
    suffix : str
        Suffix of the lesion-bright image (``FLAIR``, ``T2w``, ``T1w``...).
    extra_suffixes : sequence of str
        Suffixes of further modalities, in the order the model expects (e.g. ``("T1w",)``).
    filters : mapping, optional
        Entities the image must have, e.g. ``{"acq": "3D", "ses": "01"}``.
    participants : sequence of str, optional
        Labels to keep (``01`` or ``sub-01``); all subjects when None.
    prior_dir, mask_dir : path, optional
        Derivatives folders (mirroring ``sub-*/[ses-*/]anat``) holding each subject's external
        prior / brain mask, found by entities and by ``prior_pattern`` / ``mask_pattern``.
    allow_missing : bool
        Skip (with a warning) subjects or sessions without an image instead of failing.

    Returns
    -------
    list of DatasetSubject
        One per matching image, sorted by id.

    Raises
    ------
    DatasetError
        Not a BIDS root, no matching image at all, unknown participants, or ids that collide.
    InvalidImageError, InvalidPriorError
        A subject lacks its image (without ``allow_missing``), a modality, its prior or mask.
    """
    base = _bids_root(root)
    filters = dict(filters or {})
    priors, masks = (Path(p) if p is not None else None for p in (prior_dir, mask_dir))
    subjects: list[DatasetSubject] = []
    lacking: list[str] = []
    seen_suffixes: set[str] = set()
    for label, anat in _anat_folders(base, participants, filters.get("ses")):
        files = _nifti_files(anat) if anat.is_dir() else []
        parsed = [(p, parse_bids_name(p.name)) for p in files]
        seen_suffixes |= {info[1] for _, info in parsed if info}
        chosen = [
            (p, info[0]) for p, info in parsed if info and info[1] == suffix and _matches(info[0], filters)
        ]
        if not chosen:  # a subject without sessions, or a session, lacks the image
            if anat.parent.name.startswith("ses-") or not any(anat.parent.glob("ses-*")):
                lacking.append(str(anat.parent.relative_to(base)))
            continue
        for path, entities in chosen:
            session = dict(entities).get("ses")
            subjects.append(DatasetSubject(
                id="_".join(f"{k}-{v}" for k, v in entities), subject=label, session=session,
                images=(path, *(_companion(anat, entities, s, path) for s in extra_suffixes)),
                prior=_derivative_for(priors, base, anat, entities, prior_pattern, "prior"),
                brain_mask=_derivative_for(masks, base, anat, entities, mask_pattern, "brain mask"),
                layout="bids", root=base, entities=entities,
            ))
    _check_bids_found(base, subjects, lacking, suffix, filters, seen_suffixes, allow_missing)
    _check_unique_ids(subjects, base)
    logger.info("found %d image(s) of suffix %s in %s", len(subjects), suffix, base)
    return sorted(subjects, key=lambda s: s.id)


def _check_bids_found(
    base: Path, subjects: list, lacking: list[str], suffix: str, filters: Mapping[str, str],
    seen: set[str], allow_missing: bool,
) -> None:
    wanted = f"*_{suffix}.nii[.gz]" + (f" with {'_'.join(f'{k}-{v}' for k, v in filters.items())}"
                                       if filters else "")
    if not subjects:
        others = f"; suffixes present: {_listing(sorted(seen))}" if seen else ""
        raise DatasetError(
            f"no sub-*/[ses-*/]anat/{wanted} in {base}{others}; choose the image suffix "
            "(--bids-suffix) or the entity filters that your files have"
        )
    if lacking and not allow_missing:
        raise InvalidImageError(
            f"{_listing(lacking)} in {base} lack(s) the image anat/{wanted}; add it, restrict the run "
            "to the other participants (--participant), or skip such subjects (--keep-going; "
            "allow_missing=True in Python)"
        )
    for name in lacking:
        logger.warning("skipping %s: no anat/%s", name, wanted)

