"""Shared NIfTI helpers of :mod:`cgc_refine.io`: names, header geometry and affine checks.

Private to the package: the reading, writing and orientation modules build on these
functions, and nothing outside :mod:`cgc_refine.io` should import them. Every module of the
package logs to the one ``cgc_refine.io`` logger defined here, so that a filter or level set
on that logger covers all of them.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError
from nibabel.volumeutils import native_code

from .._utils import one_line
from ..exceptions import CGCRefineError, InvalidImageError

#: The logger of every module of the package (one name, so that callers can filter it).
logger = logging.getLogger("cgc_refine.io")

#: A file system path as accepted by every function of :mod:`cgc_refine.io`.
PathLike = Union[str, "os.PathLike[str]"]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_RAS_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
# NIfTI xform code used when a header carries no coordinate system yet ("aligned").
_ALIGNED = 2
# Deflate expands data at most ~1032-fold; a .nii.gz claiming more than this many times its
# size cannot hold its voxels.
_MAX_DEFLATE_RATIO = 1100
# Chunk of decompressed bytes counted at a time when checking a .nii.gz against its header.
_COUNT_CHUNK = 1 << 20
# Spatial units of a NIfTI header, expressed in millimetres.
_UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}
# Errors nibabel, gzip and numpy raise on unreadable, truncated or corrupt files.
_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    HeaderDataError,
    EOFError,
    zlib.error,
    OSError,
    ValueError,
    TypeError,
)


def _nifti_suffix(path: Path) -> str | None:
    """Return ``".nii.gz"`` or ``".nii"`` when the file name ends so (any case), else None."""
    lower = path.name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return suffix
    return None


def _as_nifti_header(header: object) -> nib.Nifti1Header:
    """Return an independent NIfTI header built from any nibabel header."""
    if isinstance(header, nib.Nifti1Header):  # Nifti2Header derives from Nifti1Header
        return header.copy()
    try:
        return nib.Nifti1Header.from_header(header)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a usable header"
        raise InvalidImageError(
            f"cannot use a {type(header).__name__} as a NIfTI header ({one_line(exc)}); "
            "pass a nibabel Nifti1Header/Nifti2Header or leave header=None"
        ) from exc


def _unit_factor(header: nib.Nifti1Header) -> float:
    """Millimetres per spatial unit of ``header``."""
    try:
        unit = header.get_xyzt_units()[0]
    except Exception:  # noqa: BLE001 - a broken units field is treated as "unknown"
        return 1.0
    return _UNIT_TO_MM.get(unit, 1.0)


def _affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes implied by an affine (norms of its first three columns)."""
    norms = np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def _header_spacing(header: nib.Nifti1Header, affine: np.ndarray) -> tuple[float, float, float]:
    """Spacing in mm from the header zooms, falling back to the affine if they are unusable."""
    try:
        zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64) * _unit_factor(header)
    except Exception:  # noqa: BLE001
        zooms = np.zeros(0)
    if zooms.shape == (3,) and np.all(np.isfinite(zooms)) and np.all(zooms > 0):
        if _unit_factor(header) != 1.0:
            logger.warning(
                "header spatial unit is %s; voxel sizes converted to mm %s (the affine is "
                "left in the file's units)",
                header.get_xyzt_units()[0],
                tuple(zooms.tolist()),
            )
        return (float(zooms[0]), float(zooms[1]), float(zooms[2]))
    spacing = _affine_spacing(affine)
    logger.warning(
        "header zooms %s are missing or not positive; using the voxel sizes of the affine %s",
        tuple(zooms.tolist()),
        spacing,
    )
    return spacing


def _set_geometry(
    header: nib.Nifti1Header, affine: np.ndarray, *, force: bool = False
) -> nib.Nifti1Header:
    """Make ``header`` describe ``affine``, keeping its qform/sform untouched when they do.

    The header's qform and sform (and their codes) are kept bit for bit when its best affine
    already equals ``affine`` and at least one code is set. Otherwise both forms are set to
    ``affine``; each keeps its code when it had one, else takes the other form's code, else
    "aligned" (2), so that every reader (nibabel, ITK, FSL) sees the same grid. ``set_qform``
    also updates the zooms from the affine.
    """
    qcode = int(header["qform_code"])
    scode = int(header["sform_code"])
    if not force and (qcode or scode):
        if np.allclose(header.get_best_affine(), affine, rtol=0.0, atol=1e-6):
            return header
    new_scode = scode or qcode or _ALIGNED
    new_qcode = qcode or new_scode
    header.set_sform(affine, code=new_scode)
    header.set_qform(affine, code=new_qcode)  # shears, if any, live in the sform only
    return header


def _native_endian(header: nib.Nifti1Header) -> nib.Nifti1Header:
    """Return ``header`` in the machine's byte order (keeping its extensions)."""
    if header.endianness == native_code:
        return header
    swapped = header.as_byteswapped(native_code)
    swapped.extensions[:] = list(header.extensions)
    return swapped


def _default_header(
    shape: tuple[int, int, int], affine: np.ndarray, spacing: tuple[float, float, float]
) -> nib.Nifti1Header:
    """A fresh float32 NIfTI-1 header for an in-memory volume."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header.set_xyzt_units("mm")
    _set_geometry(header, affine, force=True)
    header.set_zooms(spacing)
    return header


def _validate_affine(affine: object, error: type[CGCRefineError], what: str) -> np.ndarray:
    """Return ``affine`` as a (4, 4) float64 copy, or raise ``error``."""
    try:
        arr = np.array(affine, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise error(
            f"{what} affine is not a numeric (4, 4) matrix ({one_line(exc)}); "
            "pass a 4x4 voxel-to-world array"
        ) from exc
    if arr.shape != (4, 4):
        raise error(f"{what} affine must be (4, 4), got shape {arr.shape}; pass a 4x4 array")
    if not np.all(np.isfinite(arr)):
        raise error(
            f"{what} affine holds NaN/Inf values; fix the qform/sform of the file "
            "(e.g. with fslorient) or pass a finite affine"
        )
    if abs(np.linalg.det(arr[:3, :3])) < 1e-12:
        raise error(
            f"{what} affine is singular (a zero voxel size or collinear axes); fix the "
            "header's qform/sform/pixdim before using the image"
        )
    return arr


def _count_non_finite(data: np.ndarray) -> tuple[int, int]:
    """Number of NaN and of infinite values."""
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_inf = int(np.count_nonzero(np.isinf(data)))
    return n_nan, n_inf
