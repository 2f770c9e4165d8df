"""NIfTI input and output that never breaks geometry.

Images are read into a :class:`Volume`: a float32 array shaped ``(C, X, Y, Z)`` (one channel
per modality) together with the affine, a copy of the first file's header and the voxel
spacing. Every reader checks what it reads (readable NIfTI, 3-D, finite values, one voxel grid
for all modalities) and raises an error from :mod:`cgc_refine.exceptions` whose message names
the file and says what to do.

Writers take their geometry from a reference (a :class:`Volume` or a nibabel image): the
output keeps the reference's affine, qform/sform and their codes, zooms and other header
fields, but its data type is always set explicitly and the reference's scaling
(``scl_slope``/``scl_inter``) is reset, so a header copied from an int16 FLAIR never
quantises or rescales a probability map. Files are written atomically: to a hidden temporary
file in the destination folder, then moved into place with :func:`os.replace`; an
interrupted write leaves nothing behind. Inside :meth:`cgc_refine._utils.OutputSet.collect`
the finished temporary file is left with the output set instead, which moves all of a
command's files into place together.

:func:`to_canonical` and :func:`from_canonical` move arrays to and from the closest-RAS axis
order for code that wants to work in a fixed orientation; the round trip is exact.
"""

from __future__ import annotations

import filecmp
import gzip
import logging
import math
import os
import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np
import numpy.typing as npt
from nibabel.orientations import (
    apply_orientation,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from nibabel.spatialimages import HeaderDataError, SpatialImage
from nibabel.volumeutils import native_code

from ._utils import active_output_set, check_writable_target, overwrite_hint
from .exceptions import (
    CGCRefineError,
    InvalidImageError,
    InvalidPriorError,
    OutputExistsError,
    OutputNotWritableError,
    SpaceMismatchError,
)

__all__ = [
    "Volume",
    "load_volume",
    "load_array",
    "load_mask",
    "check_same_grid",
    "check_input_file",
    "check_output_path",
    "same_file_or_content",
    "save_array",
    "save_mask",
    "save_probability_map",
    "to_canonical",
    "from_canonical",
    "default_output_path",
]

logger = logging.getLogger(__name__)

#: A file system path as accepted by every function of this module.
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


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    """Return an exception's message on a single line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


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
            f"cannot use a {type(header).__name__} as a NIfTI header ({_one_line(exc)}); "
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
            f"{what} affine is not a numeric (4, 4) matrix ({_one_line(exc)}); "
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


# --------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class Volume:
    """One subject's image: channels of 3-D data on a single voxel grid.

    Parameters
    ----------
    data : numpy.ndarray
        Float32 array shaped ``(C, X, Y, Z)``: one channel per modality (C = 1 for a single
        file). Other float or integer arrays are cast to float32; values must be finite.
    affine : numpy.ndarray
        The (4, 4) float64 voxel-to-world matrix (RAS+ world, millimetres).
    header : nibabel.Nifti1Header
        A copy of the first source file's header (a ``Nifti2Header`` for NIfTI-2 files), kept
        so that outputs inherit its fields. Its data dtype is that of the source file.
    spacing : tuple of float
        Voxel sizes in millimetres along the three array axes (from the header zooms).
    paths : tuple of pathlib.Path
        The source files, one per channel; empty for in-memory volumes.

    Raises
    ------
    InvalidImageError
        If ``data`` is not 4-D numeric, holds NaN/Inf, or the affine or spacing is invalid.

    Notes
    -----
    The dataclass is frozen but numpy arrays stay mutable; build a modified volume with
    :func:`dataclasses.replace` (which validates again) rather than editing ``data`` in
    place. Equality is identity.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing: tuple[float, float, float]
    paths: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.dtype.fields is not None or data.dtype.kind not in "biuf":
            raise InvalidImageError(
                f"volume data must be real numbers, got dtype {data.dtype}; "
                "convert the array to float32"
            )
        if data.ndim != 4:
            raise InvalidImageError(
                f"Volume data must be 4-D (C, X, Y, Z), got shape {data.shape}; "
                "use Volume.from_array for a 3-D array"
            )
        if min(data.shape) < 1:
            raise InvalidImageError(
                f"volume data has an empty axis (shape {data.shape}); pass a non-empty array"
            )
        data = np.ascontiguousarray(data, dtype=np.float32)
        n_nan, n_inf = _count_non_finite(data)
        if n_nan or n_inf:
            raise InvalidImageError(
                f"volume data contain {n_nan} NaN and {n_inf} infinite values; replace them "
                "(e.g. numpy.nan_to_num) before building a Volume"
            )
        affine = _validate_affine(self.affine, InvalidImageError, "volume")
        spacing = tuple(float(s) for s in np.asarray(self.spacing, dtype=np.float64).ravel())
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise InvalidImageError(
                f"spacing must be three positive finite voxel sizes in mm, got {self.spacing!r}"
            )
        header = self.header
        if not isinstance(header, nib.Nifti1Header):
            header = _as_nifti_header(header)
        paths = tuple(Path(os.fsdecode(p)) for p in self.paths)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "paths", paths)

    def __repr__(self) -> str:
        return (
            f"Volume(shape={self.shape}, n_channels={self.n_channels}, "
            f"spacing={tuple(round(s, 4) for s in self.spacing)}, "
            f"axcodes={''.join(self.axcodes)}, paths={[str(p) for p in self.paths]})"
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return (int(self.data.shape[1]), int(self.data.shape[2]), int(self.data.shape[3]))

    @property
    def n_channels(self) -> int:
        """Number of channels (modalities)."""
        return int(self.data.shape[0])

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """World direction of each array axis, e.g. ``('L', 'A', 'S')``."""
        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]

    @classmethod
    def from_array(
        cls,
        data: np.ndarray,
        affine: np.ndarray | None = None,
        spacing: Sequence[float] | None = None,
        header: object | None = None,
    ) -> Volume:
        """Build a volume from an in-memory array.

        Parameters
        ----------
        data : numpy.ndarray
            A 3-D array ``(X, Y, Z)`` (becomes one channel) or a 4-D channel-first array
            ``(C, X, Y, Z)``. It is copied and cast to float32; values must be finite.
        affine : numpy.ndarray, optional
            The (4, 4) voxel-to-world matrix. When None: the header's affine if a header is
            given, else ``diag(spacing or (1, 1, 1))``.
        spacing : sequence of float, optional
            Voxel sizes in mm. When None: the header zooms if a header is given, else the
            voxel sizes of the affine (1 mm when both are None).
        header : nibabel header, optional
            A header to inherit fields from (copied; its shape, and its qform/sform when they
            disagree with ``affine``, are updated). A fresh float32 header when None.

        Returns
        -------
        Volume
            The new volume, with no source paths.

        Raises
        ------
        InvalidImageError
            If ``data`` is neither 3-D nor 4-D, holds NaN/Inf, or the geometry is invalid.
        """
        arr = np.array(data, copy=True)
        if arr.ndim == 3:
            arr = arr[np.newaxis]
        elif arr.ndim != 4:
            raise InvalidImageError(
                f"Volume.from_array needs a 3-D (X, Y, Z) or 4-D (C, X, Y, Z) array, got shape "
                f"{arr.shape}; reshape the data to channel-first order"
            )
        shape = (int(arr.shape[1]), int(arr.shape[2]), int(arr.shape[3]))
        hdr = None if header is None else _as_nifti_header(header)
        if spacing is not None:
            spacing_t = tuple(float(s) for s in spacing)
            if len(spacing_t) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_t):
                raise InvalidImageError(
                    f"spacing must be three positive finite voxel sizes in mm, got {spacing!r}"
                )
        else:
            spacing_t = None
        if affine is None:
            if hdr is not None:
                affine_arr = hdr.get_best_affine()
            else:
                affine_arr = np.diag([*(spacing_t or (1.0, 1.0, 1.0)), 1.0])
        else:
            affine_arr = affine
        affine_arr = _validate_affine(affine_arr, InvalidImageError, "volume")
        if spacing_t is None:
            if hdr is not None:
                spacing_t = _header_spacing(hdr, affine_arr)
            else:
                spacing_t = _affine_spacing(affine_arr)
        if hdr is None:
            hdr = _default_header(shape, affine_arr, spacing_t)
        else:
            hdr.set_data_shape(shape)
            _set_geometry(hdr, affine_arr)
            hdr.set_zooms(tuple(s / _unit_factor(hdr) for s in spacing_t))
        return cls(data=arr, affine=affine_arr, header=hdr, spacing=spacing_t, paths=())


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def check_input_file(
    path: PathLike, *, name: str = "image", error: type[CGCRefineError] = InvalidImageError
) -> Path:
    """Check that ``path`` names an existing NIfTI file (cheap: nothing is read).

    Useful to fail at once, before slow set-up work, on a misspelt path.

    Parameters
    ----------
    path : path
        The input file.
    name : str
        What the file is, for the message (``"image"``, ``"prior"``, ``"brain mask"``).
    error : type
        The error class raised.

    Returns
    -------
    pathlib.Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    CGCRefineError
        ``error``, if the file does not exist, is a folder, or has no .nii/.nii.gz name.
    """
    p = Path(os.fsdecode(path))
    if not p.exists():
        raise error(f"{name} file '{p}' does not exist; check the path and its spelling")
    if p.is_dir():
        raise error(f"{name} path '{p}' is a folder; pass the .nii or .nii.gz file inside it")
    if _nifti_suffix(p) is None:
        raise error(
            f"{name} file '{p}' is not a NIfTI file (the name must end in .nii or .nii.gz); "
            "convert it to NIfTI first, e.g. with dcm2niix for DICOM or nib-convert"
        )
    return p


def same_file_or_content(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name the same file (after resolving links) or files of equal bytes.

    Parameters
    ----------
    first, second : path
        Two existing files.

    Returns
    -------
    bool
        True for one file reached twice (symbolic or hard links included) or for two files
        with identical content; False otherwise, or when either cannot be read.
    """
    a, b = Path(os.fsdecode(first)), Path(os.fsdecode(second))
    try:
        if os.path.realpath(a) == os.path.realpath(b) or os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _decompressed_at_least(path: Path, needed: int) -> bool | None:
    """Whether the gzip file holds at least ``needed`` bytes once decompressed.

    Counts the decompressed stream in 1 MB chunks without keeping them (memory stays bounded)
    and stops as soon as ``needed`` bytes were seen. None when the stream is unreadable: the
    reader then reports the corruption itself.
    """
    seen = 0
    try:
        with gzip.open(path, "rb") as stream:
            while seen < needed:
                chunk = stream.read(min(_COUNT_CHUNK, needed - seen))
                if not chunk:
                    return False
                seen += len(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return True


def _check_data_size(img: nib.Nifti1Image, p: Path, *, name: str, error: type[CGCRefineError]) -> None:
    """Refuse a file whose header claims more voxel data than the file can hold.

    Runs before the voxel data are read, so that a corrupt or forged header (say 2000^3
    float32 voxels in a 1 KB file) is an error, not an attempt to allocate 32 GB. An
    uncompressed file is compared with its size on disk; a .nii.gz first with the most that
    deflate can expand it to, then with the uncompressed size in its gzip trailer (ISIZE,
    modulo 2**32), and, when that does not settle it (a multi-member file, over 4 GB), by
    counting the decompressed bytes up to what the header needs.
    """
    proxy = img.dataobj
    shape = tuple(int(s) for s in getattr(proxy, "shape", img.shape))
    dtype = np.dtype(getattr(proxy, "dtype", img.get_data_dtype()))
    offset = int(getattr(proxy, "offset", img.header.get_data_offset()))
    needed = offset + math.prod(shape) * dtype.itemsize
    size = p.stat().st_size
    if _nifti_suffix(p) == ".nii":
        holds: bool | None = size >= needed
        have = f"{size} bytes"
    else:
        have = f"{size} compressed bytes"
        if needed > size * _MAX_DEFLATE_RATIO + _COUNT_CHUNK:
            holds = False
        else:
            with open(p, "rb") as handle:
                handle.seek(max(size - 4, 0))
                isize = int.from_bytes(handle.read(4), "little")
            may_exceed_4gb = size * _MAX_DEFLATE_RATIO >= 2**32
            if isize == needed % 2**32 or (not may_exceed_4gb and isize >= needed):
                holds = True
            else:
                holds = _decompressed_at_least(p, needed)
    if holds is False:
        raise error(
            f"{name} file '{p}' is truncated or corrupt: its header describes "
            f"{'x'.join(str(s) for s in shape)} {dtype} voxels ({needed / 1e6:,.1f} MB with the "
            f"header) but the file holds only {have}; re-export or re-download the file"
        )


def _read_nifti(
    path: PathLike, *, name: str, error: type[CGCRefineError]
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header, Path]:
    """Read one 3-D NIfTI file as float32, checking everything; return data, affine, header."""
    p = check_input_file(path, name=name, error=error)
    try:
        img = nib.load(str(p), mmap=False)
    except _READ_ERRORS as exc:
        raise error(
            f"{name} file '{p}' is not a readable NIfTI file ({_one_line(exc)}); "
            "check that it is a valid .nii/.nii.gz image (e.g. with fslinfo) or re-export it"
        ) from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image derives from Nifti1Image
        raise error(
            f"{name} file '{p}' was read as {type(img).__name__}, not as a NIfTI image; "
            "re-export it as a single-file NIfTI (.nii.gz)"
        )
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        shape = shape[:3]  # trailing singleton dimensions carry no data
    if len(shape) < 3:
        raise error(
            f"{name} file '{p}' holds a {len(shape)}-D image of shape {shape}; a 3-D volume "
            "is expected, pass a 3-D NIfTI file"
        )
    if len(shape) > 3:
        raise error(
            f"{name} file '{p}' holds a {len(shape)}-D image of shape {shape}; a 3-D volume is "
            "expected: split it into 3-D volumes (e.g. fslsplit) and pass each modality as "
            "its own file"
        )
    if min(shape) < 2:
        raise error(
            f"{name} file '{p}' holds a single slice (shape {shape}), not a 3-D volume; pass "
            "a volume with at least 2 voxels along every axis"
        )
    _check_data_size(img, p, name=name, error=error)
    try:
        raw = np.asanyarray(img.dataobj)
    except _READ_ERRORS as exc:
        raise error(
            f"{name} file '{p}' is truncated or corrupt (reading its voxel data failed: "
            f"{_one_line(exc)}); re-export or re-download the file"
        ) from exc
    if raw.dtype.fields is not None or raw.dtype.kind not in "biuf":
        raise error(
            f"{name} file '{p}' stores {raw.dtype} voxels (complex or RGB), which cannot be "
            "used as intensities; convert it to a scalar image (e.g. float32)"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        data = np.ascontiguousarray(raw.reshape(shape), dtype=np.float32)
    n_nan, n_inf = _count_non_finite(data)
    if n_nan or n_inf:
        raise error(
            f"{name} file '{p}' contains {n_nan} NaN and {n_inf} infinite voxel values (as "
            "float32); replace them, e.g. with 0 (fslmaths in -nan out or numpy.nan_to_num)"
        )
    affine = _validate_affine(img.affine, error, f"{name} file '{p}':")
    header = img.header.copy()
    if header.get_data_shape() != shape:
        header.set_data_shape(shape)
    logger.debug(
        "read %s '%s': shape %s, source dtype %s, axcodes %s",
        name,
        p,
        shape,
        header.get_data_dtype(),
        "".join(nib.aff2axcodes(affine)),
    )
    return data, affine, header, p


def _resample_hint(moving: str) -> str:
    return (
        f"resample {moving} onto the reference grid, e.g. with "
        "nibabel.processing.resample_from_to (order=0 for masks and labels) or the CLI's "
        "--resample-prior"
    )


def check_same_grid(
    shape_a: Sequence[int],
    affine_a: np.ndarray,
    shape_b: Sequence[int],
    affine_b: np.ndarray,
    *,
    names: tuple[str, str] = ("image", "prior"),
    atol: float = 1e-3,
) -> None:
    """Check that two volumes share one voxel grid.

    Parameters
    ----------
    shape_a, shape_b : sequence of int
        Spatial shapes ``(X, Y, Z)``.
    affine_a, affine_b : numpy.ndarray
        Their (4, 4) voxel-to-world matrices.
    names : tuple of str
        How to call the two volumes in the error message; the second is the one the
        message asks to resample.
    atol : float
        Tolerance in voxels: the affines match when no corner of the field of view (the
        outer faces of the voxel box, ``-0.5`` to ``n - 0.5``) moves by more than
        ``atol`` times the smallest voxel size of ``affine_a``. As the map is affine, this
        bounds the displacement of every voxel centre. The default (a thousandth of a
        voxel) absorbs the float32 rounding of NIfTI headers and qform/sform conversions.

    Raises
    ------
    SpaceMismatchError
        If the shapes differ or the affines differ by more than the tolerance.
    """
    name_a, name_b = names
    sa = tuple(int(s) for s in shape_a)
    sb = tuple(int(s) for s in shape_b)
    if sa != sb:
        raise SpaceMismatchError(
            f"{name_a} (shape {sa}) and {name_b} (shape {sb}) are not on the same voxel grid: "
            f"their shapes differ; {_resample_hint(name_b)}"
        )
    a = np.asarray(affine_a, dtype=np.float64)
    b = np.asarray(affine_b, dtype=np.float64)
    if a.shape != (4, 4) or b.shape != (4, 4):
        raise SpaceMismatchError(
            f"cannot compare the grids of {name_a} and {name_b}: affines must be (4, 4), got "
            f"{a.shape} and {b.shape}; pass 4x4 voxel-to-world matrices"
        )
    if len(sa) != 3:
        raise SpaceMismatchError(
            f"cannot compare the grids of {name_a} and {name_b}: spatial shapes must have 3 "
            f"axes, got {sa}; pass (X, Y, Z) shapes"
        )
    corners = np.array(
        [[i, j, k, 1.0] for i in (-0.5, sa[0] - 0.5) for j in (-0.5, sa[1] - 0.5)
         for k in (-0.5, sa[2] - 0.5)]
    )
    shift_mm = float(np.max(np.linalg.norm((corners @ (a - b).T)[:, :3], axis=1)))
    voxel = min(_affine_spacing(a))
    bottom_ok = np.allclose(a[3], [0, 0, 0, 1]) and np.allclose(b[3], [0, 0, 0, 1])
    if not (bottom_ok and voxel > 0 and shift_mm <= atol * voxel):
        shift_vox = shift_mm / voxel if voxel > 0 else float("inf")
        try:
            codes = f"; axcodes {''.join(nib.aff2axcodes(a))} vs {''.join(nib.aff2axcodes(b))}"
        except Exception:  # noqa: BLE001 - only decoration for the message
            codes = ""
        raise SpaceMismatchError(
            f"{name_a} and {name_b} have the same shape {sa} but not the same voxel grid: "
            f"their affines place voxels up to {shift_mm:.4g} mm ({shift_vox:.3g} voxels) "
            f"apart (tolerance {atol:g} voxels{codes}); {_resample_hint(name_b)}"
        )


def load_volume(paths: PathLike | Sequence[PathLike], *, name: str = "image") -> Volume:
    """Read one or several NIfTI files as a multi-channel :class:`Volume`.

    Parameters
    ----------
    paths : path or sequence of paths
        One ``.nii``/``.nii.gz`` file, or several (modalities) stacked as channels in the
        order given. A string is always one path.
    name : str
        What the files are, used in error messages (e.g. ``"image"``, ``"FLAIR"``).

    Returns
    -------
    Volume
        Float32 data shaped ``(C, X, Y, Z)`` with the first file's affine, header copy and
        spacing; ``paths`` records the files.

    Raises
    ------
    InvalidImageError
        If a file is missing, not NIfTI, truncated or corrupt, not 3-D (a trailing
        singleton 4th dimension is squeezed), a single slice, or holds NaN/Inf values.
    SpaceMismatchError
        If several files are not on one voxel grid.
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        path_list = [paths]
    else:
        path_list = list(paths)
    if not path_list:
        raise InvalidImageError(f"no {name} file given; pass at least one .nii/.nii.gz path")
    channels: list[np.ndarray] = []
    first: tuple[np.ndarray, nib.Nifti1Header, Path] | None = None
    read_paths: list[Path] = []
    for index, path in enumerate(path_list):
        data, affine, header, p = _read_nifti(path, name=name, error=InvalidImageError)
        if first is None:
            first = (affine, header, p)
        else:
            check_same_grid(
                channels[0].shape,
                first[0],
                data.shape,
                affine,
                names=(f"{name} channel 0 ('{first[2]}')", f"{name} channel {index} ('{p}')"),
            )
        if float(data.min()) == float(data.max()):
            logger.warning("%s file '%s' is constant (every voxel is %g)", name, p, data.min())
        channels.append(data)
        read_paths.append(p)
    assert first is not None
    affine, header, _ = first
    stacked = np.stack(channels, axis=0)
    volume = Volume(
        data=stacked,
        affine=affine,
        header=header,
        spacing=_header_spacing(header, affine),
        paths=tuple(read_paths),
    )
    logger.debug("loaded %r", volume)
    return volume


def load_array(
    path: PathLike,
    *,
    reference: Volume | None = None,
    name: str = "prior",
    error: type[CGCRefineError] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one 3-D NIfTI map (mask, labels, scores, probabilities) keeping its values.

    Parameters
    ----------
    path : path
        A ``.nii``/``.nii.gz`` file.
    reference : Volume, optional
        When given, the map must lie on this volume's voxel grid.
    name : str
        What the file is, used in error messages.
    error : type, optional
        The error class raised for an unusable file. By default
        :class:`~cgc_refine.exceptions.InvalidPriorError` when ``name == "prior"``, else
        :class:`~cgc_refine.exceptions.InvalidImageError`.

    Returns
    -------
    data : numpy.ndarray
        The float32 ``(X, Y, Z)`` values, scaled by the file's ``scl_slope``/``scl_inter``
        but otherwise unchanged.
    affine : numpy.ndarray
        Its (4, 4) float64 affine.

    Raises
    ------
    InvalidImageError or InvalidPriorError
        As :func:`load_volume`, for a missing, non-NIfTI, corrupt, non-3-D or non-finite
        file (class chosen by ``error``).
    SpaceMismatchError
        If ``reference`` is given and the grids differ.
    """
    if error is None:
        error = InvalidPriorError if name == "prior" else InvalidImageError
    data, affine, _, p = _read_nifti(path, name=name, error=error)
    if reference is not None:
        ref_name = f"image ('{reference.paths[0]}')" if reference.paths else "image"
        check_same_grid(
            reference.shape,
            reference.affine,
            data.shape,
            affine,
            names=(ref_name, f"{name} ('{p}')"),
        )
    return data, affine


def load_mask(
    path: PathLike, reference: Volume | None = None, *, name: str = "mask"
) -> np.ndarray:
    """Read a binary mask as a boolean array.

    Parameters
    ----------
    path : path
        A ``.nii``/``.nii.gz`` file; voxels whose value is above 0.5 (after the float32
        cast) are in the mask, so uint8 {0, 1}, label maps and float masks stored as
        0.99999997 all work.
    reference : Volume, optional
        When given, the mask must lie on this volume's voxel grid.
    name : str
        What the file is, used in error messages.

    Returns
    -------
    numpy.ndarray
        Boolean ``(X, Y, Z)`` array.

    Raises
    ------
    InvalidImageError
        For a missing, non-NIfTI, corrupt, non-3-D or non-finite file.
    SpaceMismatchError
        If ``reference`` is given and the grids differ.
    """
    data, _ = load_array(path, reference=reference, name=name, error=InvalidImageError)
    mask = data > 0.5
    if not mask.any():
        logger.warning("%s file '%s' holds no voxel above 0.5", name, path)
    return mask


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def check_output_path(path: PathLike, *, overwrite: bool = False) -> Path:
    """Check that a NIfTI file can be written at ``path``; useful to fail early.

    Parameters
    ----------
    path : path
        The destination; its name must end in ``.nii`` or ``.nii.gz``.
    overwrite : bool
        Whether an existing file may be replaced.

    Returns
    -------
    pathlib.Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    OutputExistsError
        If the file exists and ``overwrite`` is False.
    OutputNotWritableError
        If the name is not a NIfTI name, the path is a folder, or its folder is missing or
        not writable.
    """
    p = Path(os.fsdecode(path))
    if _nifti_suffix(p) is None:
        raise OutputNotWritableError(
            f"cannot write '{p}': the output name must end in .nii.gz or .nii; "
            "choose a NIfTI file name"
        )
    return check_writable_target(p, overwrite)


def _reference_geometry(
    reference: Volume | SpatialImage,
) -> tuple[tuple[int, int, int], np.ndarray, object]:
    """Spatial shape, affine and header of a writer's reference."""
    if isinstance(reference, Volume):
        return reference.shape, reference.affine, reference.header
    if isinstance(reference, SpatialImage):
        shape = tuple(int(s) for s in reference.shape)
        if len(shape) > 3 and all(s == 1 for s in shape[3:]):
            shape = shape[:3]
        if len(shape) != 3:
            raise InvalidImageError(
                f"the reference image has shape {shape}; a 3-D reference is needed to write "
                "a 3-D map, pass a 3-D image or a Volume"
            )
        affine = reference.affine
        if affine is None:
            affine = _as_nifti_header(reference.header).get_best_affine()
        affine = _validate_affine(affine, InvalidImageError, "reference")
        return (shape[0], shape[1], shape[2]), affine, reference.header
    raise InvalidImageError(
        f"reference must be a cgc_refine Volume or a nibabel image, got "
        f"{type(reference).__name__}; load it with load_volume or nibabel.load"
    )


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove temporary file '%s': %s", path, _one_line(exc))


def _fsync(path: Path) -> None:
    """Best-effort flush of a written file to disk before it is moved into place."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``dest``; without ``overwrite`` never replace a file that appeared."""
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # atomic and fails if dest exists: no check-then-act race
    except FileExistsError as exc:
        raise OutputExistsError(
            f"output '{dest}' already exists (it appeared while writing); {overwrite_hint()} "
            "to replace it, or choose another path"
        ) from exc
    except OSError:
        # File systems without hard links: check, then replace.
        if os.path.lexists(dest):
            raise OutputExistsError(
                f"output '{dest}' already exists; {overwrite_hint()} to replace it, or "
                "choose another path"
            ) from None
        os.replace(tmp, dest)


def _verify_written(
    tmp: Path, shape: tuple[int, int, int], affine: np.ndarray, dtype: np.dtype
) -> None:
    """Re-read the written header and check shape, data type and grid."""
    header = nib.load(str(tmp)).header
    if tuple(header.get_data_shape()) != shape or header.get_data_dtype() != dtype:
        raise SpaceMismatchError(
            f"internal check failed: the written file has shape {header.get_data_shape()} and "
            f"dtype {header.get_data_dtype()}, expected {shape} and {dtype}; please report this"
        )
    check_same_grid(
        shape, affine, shape, header.get_best_affine(), names=("reference", "written output")
    )


def _atomic_save(img: nib.Nifti1Image, path: PathLike, *, overwrite: bool) -> Path:
    """Write ``img`` to ``path`` through a hidden temporary file in the same folder."""
    dest = check_output_path(path, overwrite=overwrite)
    suffix = _nifti_suffix(dest)
    assert suffix is not None
    stem = dest.name[: -len(suffix)]
    tmp = dest.parent / f".{stem}.tmp-{secrets.token_hex(6)}{suffix}"
    output_set = active_output_set()
    kept = False
    try:
        try:
            nib.save(img, str(tmp))
            _fsync(tmp)
            _verify_written(tmp, img.shape, img.affine, img.get_data_dtype())
            if output_set is not None:  # moved into place with the rest of its output set
                output_set.keep(tmp, dest)
                kept = True
            else:
                _commit(tmp, dest, overwrite)
        except CGCRefineError:
            raise
        except PermissionError as exc:
            raise OutputNotWritableError(
                f"cannot write '{dest}': permission denied ({_one_line(exc)}); fix the "
                "folder's permissions or choose another output folder"
            ) from exc
        except OSError as exc:
            raise OutputNotWritableError(
                f"cannot write '{dest}' ({_one_line(exc)}); check free disk space and the "
                "output folder, or choose another output path"
            ) from exc
    finally:
        if not kept:
            _remove_quietly(tmp)
    logger.debug("wrote '%s' (shape %s, dtype %s)", dest, img.shape, img.get_data_dtype())
    return dest


def save_array(
    array: np.ndarray,
    reference: Volume | SpatialImage,
    path: PathLike,
    dtype: npt.DTypeLike,
    overwrite: bool = False,
    *,
    cal_range: tuple[float, float] | None = None,
) -> Path:
    """Write a 3-D array on the reference grid as a NIfTI file, atomically.

    Parameters
    ----------
    array : numpy.ndarray
        ``(X, Y, Z)`` values (a leading singleton channel axis is dropped); must be finite
        and, for an integer ``dtype``, whole numbers within its range.
    reference : Volume or nibabel image
        Gives the grid: the array shape must equal its spatial shape. The output keeps its
        affine, qform/sform and codes, zooms and other header fields.
    path : path
        Destination ending in ``.nii.gz`` (compressed) or ``.nii``.
    dtype : numpy dtype-like
        The data type stored on disk. It is set in the header explicitly, and the
        reference's ``scl_slope``/``scl_inter`` are reset, so values are stored unscaled.
    overwrite : bool
        Whether an existing file may be replaced.
    cal_range : tuple of float, optional
        ``(cal_min, cal_max)`` display range; the data range when None.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    SpaceMismatchError
        If the array shape differs from the reference's spatial shape.
    InvalidImageError
        If the array holds NaN/Inf, does not fit ``dtype``, or ``dtype`` is not storable in
        NIfTI.
    OutputExistsError
        If the file exists and ``overwrite`` is False.
    OutputNotWritableError
        If the destination cannot be written.
    """
    shape, affine, ref_header = _reference_geometry(reference)
    arr = np.asarray(array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != shape:
        raise SpaceMismatchError(
            f"cannot write an array of shape {arr.shape} on a reference grid of shape {shape}; "
            "pass an array computed on the reference's voxel grid (map results computed on "
            "the canonical grid back with from_canonical)"
        )
    if arr.dtype.fields is not None or arr.dtype.kind not in "biuf":
        raise InvalidImageError(
            f"cannot write an array of dtype {arr.dtype}; convert it to a real-valued array"
        )
    out_dtype = np.dtype(dtype)
    if arr.dtype.kind == "f":
        n_nan, n_inf = _count_non_finite(arr)
        if n_nan or n_inf:
            raise InvalidImageError(
                f"cannot write '{path}': the array holds {n_nan} NaN and {n_inf} infinite "
                "values; fix the computation or replace them (numpy.nan_to_num)"
            )
    if out_dtype.kind in "iub":
        info = np.iinfo(np.uint8 if out_dtype.kind == "b" else out_dtype)
        low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if low < info.min or high > info.max:
            raise InvalidImageError(
                f"cannot write '{path}' as {out_dtype}: values span [{low:g}, {high:g}], "
                f"outside [{info.min}, {info.max}]; choose a wider dtype or rescale"
            )
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise InvalidImageError(
                f"cannot write '{path}' as {out_dtype}: the array holds non-integer values; "
                "round or threshold it first, or write a float dtype"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=out_dtype)
    if out_dtype.kind == "f" and not np.all(np.isfinite(out)):
        raise InvalidImageError(
            f"cannot write '{path}' as {out_dtype}: values overflow that type; "
            "choose a wider float dtype"
        )

    header = _native_endian(_as_nifti_header(ref_header))
    header.set_data_shape(shape)
    try:
        header.set_data_dtype(out_dtype)
    except HeaderDataError as exc:
        raise InvalidImageError(
            f"cannot write '{path}': NIfTI cannot store {out_dtype} ({_one_line(exc)}); "
            "use uint8, int16, int32 or float32"
        ) from exc
    header.set_slope_inter(None, None)  # no scaling: values are stored as they are
    header.set_intent("none")
    if cal_range is None:
        cal_range = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)
    header["cal_min"], header["cal_max"] = cal_range
    _set_geometry(header, affine)
    img_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # Pass the header's own affine so nibabel keeps the qform/sform as prepared above.
    img = img_class(out, header.get_best_affine(), header=header)
    img.set_data_dtype(out_dtype)
    img.header.set_slope_inter(None, None)
    return _atomic_save(img, path, overwrite=overwrite)


def save_mask(
    mask: np.ndarray,
    reference: Volume | SpatialImage,
    path: PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a binary mask as uint8 {0, 1} on the reference grid.

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean ``(X, Y, Z)`` array; numeric arrays are thresholded at 0.5 (a warning is
        logged when they hold values other than 0 and 1).
    reference : Volume or nibabel image
        Gives grid and header (see :func:`save_array`).
    path : path
        Destination ``.nii.gz``/``.nii`` file.
    overwrite : bool
        Whether an existing file may be replaced.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    SpaceMismatchError, InvalidImageError, OutputExistsError, OutputNotWritableError
        As :func:`save_array`.
    """
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        if arr.dtype.kind == "f":
            n_nan, n_inf = _count_non_finite(arr)
            if n_nan or n_inf:
                raise InvalidImageError(
                    f"cannot write mask '{path}': it holds {n_nan} NaN and {n_inf} infinite "
                    "values; fix the computation that produced it"
                )
        if arr.dtype.fields is not None or arr.dtype.kind not in "biuf":
            raise InvalidImageError(
                f"cannot write mask '{path}' of dtype {arr.dtype}; pass a boolean array"
            )
        binary = arr > 0.5
        off = int(np.count_nonzero(np.abs(arr.astype(np.float64) - binary) > 1e-6))
        if off:
            logger.warning(
                "mask for '%s' holds %d values other than 0 and 1; thresholded at 0.5", path, off
            )
        arr = binary
    return save_array(
        arr.astype(np.uint8), reference, path, np.uint8, overwrite, cal_range=(0.0, 1.0)
    )


def save_probability_map(
    prob: np.ndarray,
    reference: Volume | SpatialImage,
    path: PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a probability map as float32 clipped to [0, 1] on the reference grid.

    Parameters
    ----------
    prob : numpy.ndarray
        ``(X, Y, Z)`` probabilities; values outside [0, 1] are clipped (a warning is
        logged when they leave it by more than 1e-6).
    reference : Volume or nibabel image
        Gives grid and header (see :func:`save_array`).
    path : path
        Destination ``.nii.gz``/``.nii`` file.
    overwrite : bool
        Whether an existing file may be replaced.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    InvalidImageError
        If the map holds NaN or infinite values.
    SpaceMismatchError, OutputExistsError, OutputNotWritableError
        As :func:`save_array`.
    """
    arr = np.asarray(prob)
    if arr.dtype.fields is not None or arr.dtype.kind not in "biuf":
        raise InvalidImageError(
            f"cannot write probability map '{path}' of dtype {arr.dtype}; pass a float array"
        )
    arr = arr.astype(np.float32)
    n_nan, n_inf = _count_non_finite(arr)
    if n_nan or n_inf:
        raise InvalidImageError(
            f"cannot write probability map '{path}': it holds {n_nan} NaN and {n_inf} "
            "infinite values; fix the computation that produced it"
        )
    outside = int(np.count_nonzero((arr < -1e-6) | (arr > 1.0 + 1e-6)))
    if outside:
        logger.warning(
            "probability map for '%s' has %d values outside [0, 1]; clipped", path, outside
        )
    return save_array(
        np.clip(arr, 0.0, 1.0), reference, path, np.float32, overwrite, cal_range=(0.0, 1.0)
    )


# --------------------------------------------------------------------------------------------
# Orientation
# --------------------------------------------------------------------------------------------


def to_canonical(volume: Volume) -> Volume:
    """Reorder a volume's axes to the closest RAS+ orientation.

    Axes are permuted and flipped (no interpolation), so that the first array axis points
    closest to Right, the second to Anterior, the third to Superior. The affine is updated
    so that every voxel keeps its world position, and the spacing is permuted with the axes.

    Parameters
    ----------
    volume : Volume
        Any volume.

    Returns
    -------
    Volume
        The reoriented volume (``axcodes == ('R', 'A', 'S')``), or ``volume`` itself when it
        is already in that order. Its header's qform/sform describe the new affine.
    """
    ornt = io_orientation(volume.affine)
    if np.array_equal(ornt, _RAS_ORNT):
        return volume
    moved = apply_orientation(np.moveaxis(volume.data, 0, -1), ornt)
    data = np.ascontiguousarray(np.moveaxis(moved, -1, 0))
    affine = volume.affine @ inv_ornt_aff(ornt, volume.shape)
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        spacing[int(target)] = volume.spacing[axis]
    header = volume.header.copy()
    header.set_data_shape(data.shape[1:])
    _set_geometry(header, affine, force=True)
    return Volume(
        data=data,
        affine=affine,
        header=header,
        spacing=(spacing[0], spacing[1], spacing[2]),
        paths=volume.paths,
    )


def from_canonical(array: np.ndarray, original: Volume) -> np.ndarray:
    """Map an array computed on the canonical grid back to the original voxel grid.

    Parameters
    ----------
    array : numpy.ndarray
        A ``(X, Y, Z)`` or channel-first ``(C, X, Y, Z)`` array on the grid of
        ``to_canonical(original)``; any dtype.
    original : Volume
        The volume that was passed to :func:`to_canonical`.

    Returns
    -------
    numpy.ndarray
        A new C-contiguous array of the same dtype on ``original``'s grid; the round trip
        ``from_canonical(to_canonical(v).data, v)`` equals ``v.data`` exactly.

    Raises
    ------
    SpaceMismatchError
        If the array's spatial shape is not that of the canonical grid.
    InvalidImageError
        If the array is neither 3-D nor 4-D.
    """
    arr = np.asarray(array)
    if arr.ndim not in (3, 4):
        raise InvalidImageError(
            f"from_canonical needs a 3-D (X, Y, Z) or 4-D (C, X, Y, Z) array, got shape "
            f"{arr.shape}"
        )
    ornt = io_orientation(original.affine)
    canonical_shape = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        canonical_shape[int(target)] = original.shape[axis]
    spatial = arr.shape[-3:]
    if tuple(spatial) != tuple(canonical_shape):
        raise SpaceMismatchError(
            f"array of spatial shape {tuple(spatial)} is not on the canonical grid of the "
            f"original volume (shape {tuple(canonical_shape)}); pass an array computed on "
            "to_canonical(original)"
        )
    back = ornt_transform(_RAS_ORNT, ornt)
    if arr.ndim == 3:
        result = apply_orientation(arr, back)
    else:
        result = np.moveaxis(apply_orientation(np.moveaxis(arr, 0, -1), back), -1, 0)
    return np.array(result, order="C", copy=True)


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


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
