"""Output file names derived from input image names (BIDS-style suffixes)."""

from __future__ import annotations

import os
from pathlib import Path

from ._nifti import PathLike, _nifti_suffix

__all__ = ["default_output_path"]


def default_output_path(
    image_path: PathLike,
    suffix: str = "label-lesion_mask",
    *,
    out_dir: PathLike | None = None,
) -> Path:
    """BIDS-style output name next to an input image.

    Parameters
    ----------
    image_path : path
        The input image, e.g. ``sub-01/anat/sub-01_FLAIR.nii.gz``.
    suffix : str
        Appended to the image's stem after an underscore.
    out_dir : path, optional
        Folder for the output; the image's folder when None.

    Returns
    -------
    pathlib.Path
        ``<folder>/<stem>_<suffix>.nii.gz``, where ``<stem>`` is the file name without
        ``.nii``/``.nii.gz``: ``sub-01_FLAIR.nii.gz`` gives
        ``sub-01_FLAIR_label-lesion_mask.nii.gz``.
    """
    p = Path(os.fsdecode(image_path))
    ext = _nifti_suffix(p)
    stem = p.name[: -len(ext)] if ext else p.name
    folder = p.parent if out_dir is None else Path(os.fsdecode(out_dir))
    return folder / f"{stem}_{suffix}.nii.gz"
