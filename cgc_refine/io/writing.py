"""Writing NIfTI files atomically, with the geometry of a reference image.

Writers take their geometry from a reference (a :class:`~cgc_refine.io.Volume` or a nibabel
image): the output keeps the reference's affine, qform/sform and their codes, zooms and
other header fields, but its data type is always set explicitly and the reference's scaling
(``scl_slope``/``scl_inter``) is reset, so a header copied from an int16 FLAIR never
quantises or rescales a probability map. Files are written atomically: to a hidden temporary
file in the destination folder, then moved into place with :func:`os.replace`; an
interrupted write leaves nothing behind. Inside :meth:`cgc_refine._utils.OutputSet.collect`
the finished temporary file is left with the output set instead, which moves all of a
command's files into place together.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
from nibabel.spatialimages import HeaderDataError, SpatialImage

from .._utils import active_output_set, check_writable_target, move_into_place, one_line
from ..exceptions import (
    CGCRefineError,
    InvalidImageError,
    OutputNotWritableError,
    SpaceMismatchError,
)
from ._nifti import (
    PathLike,
    _as_nifti_header,
    _count_non_finite,
    _native_endian,
    _nifti_suffix,
    _set_geometry,
    _validate_affine,
    logger,
)
from .reading import check_same_grid
from .volume import Volume

__all__ = ["check_output_path", "save_array", "save_mask", "save_probability_map"]


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
        ``path`` as a :class:`~pathlib.Path`, ready for a writer of this module.

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
        logger.warning("could not remove temporary file '%s': %s", path, one_line(exc))


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
                move_into_place(tmp, dest, overwrite=overwrite)
        except CGCRefineError:
            raise
        except PermissionError as exc:
            raise OutputNotWritableError(
                f"cannot write '{dest}': permission denied ({one_line(exc)}); fix the "
                "folder's permissions or choose another output folder"
            ) from exc
        except OSError as exc:
            raise OutputNotWritableError(
                f"cannot write '{dest}' ({one_line(exc)}); check free disk space and the "
                "output folder, or choose another output path"
            ) from exc
    finally:
        if not kept:
            _remove_quietly(tmp)
    logger.debug("wrote '%s' (shape %s, dtype %s)", dest, img.shape, img.get_data_dtype())
    return dest


# --------------------------------------------------------------------------------------------
# Checking what is written
# --------------------------------------------------------------------------------------------


def _refuse_non_real(arr: np.ndarray, target: str, hint: str) -> None:
    """Raise :class:`InvalidImageError` unless ``arr`` holds real numbers (bool, int, float)."""
    if arr.dtype.fields is not None or arr.dtype.kind not in "biuf":
        raise InvalidImageError(f"cannot write {target} of dtype {arr.dtype}; {hint}")


def _refuse_non_finite(
    arr: np.ndarray,
    target: str,
    *,
    holder: str = "it",
    hint: str = "fix the computation that produced it",
) -> None:
    """Raise :class:`InvalidImageError` when ``arr`` holds NaN or infinite values."""
    n_nan, n_inf = _count_non_finite(arr)
    if n_nan or n_inf:
        raise InvalidImageError(
            f"cannot write {target}: {holder} holds {n_nan} NaN and {n_inf} infinite values; "
            f"{hint}"
        )


def _stored_array(
    arr: np.ndarray, shape: tuple[int, int, int], out_dtype: np.dtype, path: PathLike
) -> np.ndarray:
    """``arr`` checked against the grid and ``out_dtype`` and cast to it (C-contiguous)."""
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != shape:
        raise SpaceMismatchError(
            f"cannot write an array of shape {arr.shape} on a reference grid of shape {shape}; "
            "pass an array computed on the reference's voxel grid (map results computed on "
            "the canonical grid back with from_canonical)"
        )
    _refuse_non_real(arr, "an array", "convert it to a real-valued array")
    if arr.dtype.kind == "f":
        _refuse_non_finite(
            arr,
            f"'{path}'",
            holder="the array",
            hint="fix the computation or replace them (numpy.nan_to_num)",
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
    return out


def _output_header(
    ref_header: object,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    out_dtype: np.dtype,
    cal_range: tuple[float, float],
    path: PathLike,
) -> nib.Nifti1Header:
    """The reference's header made to describe an unscaled ``out_dtype`` map on its grid."""
    header = _native_endian(_as_nifti_header(ref_header))
    header.set_data_shape(shape)
    try:
        header.set_data_dtype(out_dtype)
    except HeaderDataError as exc:
        raise InvalidImageError(
            f"cannot write '{path}': NIfTI cannot store {out_dtype} ({one_line(exc)}); "
            "use uint8, int16, int32 or float32"
        ) from exc
    header.set_slope_inter(None, None)  # no scaling: values are stored as they are
    header.set_intent("none")
    header["cal_min"], header["cal_max"] = cal_range
    _set_geometry(header, affine)
    return header


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


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
    out_dtype = np.dtype(dtype)
    out = _stored_array(np.asarray(array), shape, out_dtype, path)
    if cal_range is None:
        cal_range = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)
    header = _output_header(ref_header, shape, affine, out_dtype, cal_range, path)
    img_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # Pass the header's own affine so nibabel keeps the qform/sform as prepared above.
    img = img_class(out, header.get_best_affine(), header=header)
    img.set_data_dtype(out_dtype)
    img.header.set_slope_inter(None, None)
    return _atomic_save(img, path, overwrite=overwrite)


def save_mask(
    mask: np.ndarray, reference: Volume | SpatialImage, path: PathLike, *, overwrite: bool = False
) -> Path:
    """Write a binary mask as uint8 {0, 1} on the reference grid.

    The values are stored unscaled, with the display range ``cal_min``/``cal_max`` set to
    [0, 1] so that viewers show the mask without windowing.

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
        The written mask.

    Raises
    ------
    SpaceMismatchError, InvalidImageError, OutputExistsError, OutputNotWritableError
        As :func:`save_array`.
    """
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        if arr.dtype.kind == "f":
            _refuse_non_finite(arr, f"mask '{path}'")
        _refuse_non_real(arr, f"mask '{path}'", "pass a boolean array")
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
    prob: np.ndarray, reference: Volume | SpatialImage, path: PathLike, *, overwrite: bool = False
) -> Path:
    """Write a probability map as float32 clipped to [0, 1] on the reference grid.

    Parameters
    ----------
    prob : numpy.ndarray
        ``(X, Y, Z)`` probabilities; values outside [0, 1] are clipped (a warning is
        logged when they leave it by more than 1e-6).
    reference, path, overwrite
        As for :func:`save_mask`.

    Returns
    -------
    pathlib.Path
        The written map.

    Raises
    ------
    InvalidImageError
        If the map holds NaN or infinite values.
    SpaceMismatchError, OutputExistsError, OutputNotWritableError
        As :func:`save_array`.
    """
    arr = np.asarray(prob)
    _refuse_non_real(arr, f"probability map '{path}'", "pass a float array")
    arr = arr.astype(np.float32)
    _refuse_non_finite(arr, f"probability map '{path}'")
    outside = int(np.count_nonzero((arr < -1e-6) | (arr > 1.0 + 1e-6)))
    if outside:
        logger.warning(
            "probability map for '%s' has %d values outside [0, 1]; clipped", path, outside
        )
    return save_array(
        np.clip(arr, 0.0, 1.0), reference, path, np.float32, overwrite, cal_range=(0.0, 1.0)
    )
