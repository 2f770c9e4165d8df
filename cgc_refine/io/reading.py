"""Reading NIfTI files into :class:`~cgc_refine.io.Volume` objects and arrays, with checks.

Every reader checks what it reads (an existing .nii/.nii.gz file, readable, 3-D, not
truncated, finite values, one voxel grid for all modalities) and raises an error from
:mod:`cgc_refine.exceptions` whose message names the file and says what to do.
:func:`check_same_grid` is the one test of "same voxel grid" used by readers and writers.
"""

from __future__ import annotations

import filecmp
import gzip
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from .._utils import one_line
from ..exceptions import (
    CGCRefineError,
    InvalidImageError,
    InvalidPriorError,
    SpaceMismatchError,
)
from ._nifti import (
    _COUNT_CHUNK,
    _MAX_DEFLATE_RATIO,
    _READ_ERRORS,
    PathLike,
    _affine_spacing,
    _count_non_finite,
    _header_spacing,
    _nifti_suffix,
    _validate_affine,
    logger,
)
from .volume import Volume

__all__ = [
    "check_input_file",
    "check_same_grid",
    "load_array",
    "load_mask",
    "load_volume",
    "same_file_or_content",
]


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
            f"{name} file '{p}' is not a readable NIfTI file ({one_line(exc)}); "
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
            f"{one_line(exc)}); re-export or re-download the file"
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
