"""Which slices a report shows, and their geometry: slice choice, panel extents, side labels.

Pure numpy (plus nibabel's orientation helpers): nothing here needs matplotlib, so slice
choice and panel geometry can be tested and reused without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._validation import as_3d, check_spacing
from ..exceptions import InvalidImageError, SpaceMismatchError

__all__ = ["ORIENTATIONS", "lesion_slices", "panel_extent", "side_labels"]

#: Display conventions of :func:`~cgc_refine.report.render_montage`.
ORIENTATIONS = ("neurological", "radiological", "voxel")
_POSITIVE, _NEGATIVE = "RAS", "LPI"  # the letter at the high and the low end of each RAS axis


def _check_axis(axis: int) -> int:
    """``axis`` as 0, 1 or 2 (negative values count from the end); ValueError otherwise."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -3 <= int(axis) <= 2:
        raise ValueError(f"axis must be 0, 1 or 2 (a voxel axis of the 3-D volume), got {axis!r}")
    return int(axis) % 3


def _as_float_3d(array: Any, name: str) -> np.ndarray:
    """A finite float 3-D array; a (1, X, Y, Z) or (C, X, Y, Z) array gives its first channel."""
    data = np.asarray(getattr(array, "data", array))
    if data.dtype == object or data.dtype.kind not in "biuf":
        raise InvalidImageError(f"{name} must be a numeric array, got dtype {data.dtype}")
    data = as_3d(data, name, first_channel=True)
    if min(data.shape) < 1:
        raise InvalidImageError(f"{name} has an empty axis (shape {data.shape})")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return data


def _central_slices(size: int, n: int) -> list[int]:
    """``n`` slices evenly spread around the middle of an axis of ``size`` slices."""
    n = min(n, size)
    picks = [round((size - 1) * (i + 1) / (n + 1)) for i in range(n)]
    chosen: list[int] = []
    for index in picks:
        while index in chosen and index + 1 < size:
            index += 1
        if index not in chosen:
            chosen.append(index)
    for index in range(size):  # only for tiny axes where rounding collided
        if len(chosen) >= n:
            break
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


def _pick_spread(order: Sequence[int], n: int, chosen: list[int]) -> None:
    """Add candidates in ``order`` to ``chosen``: first never next to a chosen one, then any."""
    for gap in (2, 1):
        for index in order:
            if len(chosen) >= n:
                return
            if index not in chosen and all(abs(index - other) >= gap for other in chosen):
                chosen.append(index)


def lesion_slices(
    masks: Any | Sequence[Any],
    n: int = 3,
    axis: int = 2,
) -> list[int]:
    """The slices that show the most lesion, spread out.

    Parameters
    ----------
    masks : array-like or sequence of array-like
        One 3-D mask or probability map, or several on the same grid (``None`` entries are
        skipped). A voxel is lesion when its value is ``>= 0.5`` in any of them.
    n : int
        How many slices (at most the number of slices along ``axis``).
    axis : int
        The voxel axis the slices are taken along (default 2, the third axis).

    Returns
    -------
    list of int
        Sorted slice indices. The slices with the most lesion voxels come first, skipping a
        slice next to one already chosen as long as other lesion slices remain; when fewer
        than ``n`` slices hold lesion, slices near the lesions fill up the list. Without any
        lesion voxel: ``n`` slices evenly spread around the centre of the axis.

    Raises
    ------
    ValueError
        If ``n`` is not a positive integer or ``axis`` is not 0, 1 or 2, or no mask is given.
    SpaceMismatchError
        If the masks have different shapes.
    InvalidImageError
        If a mask is not a 3-D numeric array.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    axis = _check_axis(axis)
    if isinstance(masks, np.ndarray) or hasattr(masks, "__array__") or not isinstance(masks, Sequence):
        items = [masks]
    else:
        items = list(masks)
    arrays = [_as_float_3d(m, "mask") for m in items if m is not None]
    if not arrays:
        raise ValueError("lesion_slices needs at least one mask; got none (all None)")
    shape = arrays[0].shape
    for other in arrays[1:]:
        if other.shape != shape:
            raise SpaceMismatchError(
                f"masks have different shapes {shape} and {other.shape}; pass masks on one grid"
            )
    union = np.zeros(shape, dtype=bool)
    for array in arrays:
        union |= array >= 0.5
    size = shape[axis]
    n = min(int(n), size)
    other_axes = tuple(a for a in range(3) if a != axis)
    counts = union.sum(axis=other_axes)
    if not counts.any():
        return _central_slices(size, n)
    lesion = [int(i) for i in np.flatnonzero(counts)]
    chosen: list[int] = []
    _pick_spread(sorted(lesion, key=lambda i: (-int(counts[i]), i)), n, chosen)
    if len(chosen) < n:
        centre = float((np.arange(size) * counts).sum() / counts.sum())
        rest = sorted((i for i in range(size) if counts[i] == 0), key=lambda i: (abs(i - centre), i))
        _pick_spread(rest, n, chosen)
    return sorted(chosen)


def panel_extent(
    shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0), axis: int = 2
) -> tuple[float, float, float, float]:
    """The ``imshow`` extent (mm) of one slice, so that a panel keeps the voxels' proportions.

    Parameters
    ----------
    shape : sequence of 3 int
        The volume's voxel grid.
    spacing : sequence of 3 float
        Voxel size in mm along each array axis.
    axis : int
        The axis the slices are taken along; the other two span the panel (the first one
        horizontally, the second vertically).

    Returns
    -------
    tuple of 4 float
        ``(0, width_mm, 0, height_mm)``; the panel's aspect ratio is ``height_mm / width_mm``.
    """
    axis = _check_axis(axis)
    size = tuple(int(s) for s in shape)
    if len(size) != 3:
        raise InvalidImageError(f"shape must have 3 entries, got {shape!r}")
    sp = check_spacing(spacing, hint="; pass e.g. volume.spacing")
    horizontal, vertical = (a for a in range(3) if a != axis)
    return (0.0, size[horizontal] * sp[horizontal], 0.0, size[vertical] * sp[vertical])


def _canonical_transform(affine: Any) -> np.ndarray:
    """The nibabel orientation transform from the voxel axes of ``affine`` to RAS (closest
    canonical axes): row ``i`` holds the RAS axis voxel axis ``i`` goes to and ``-1`` when it
    is reversed."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise InvalidImageError(f"affine must be a finite 4 x 4 matrix, got shape {matrix.shape}")
    return ornt_transform(io_orientation(matrix), axcodes2ornt("RAS"))


def side_labels(axis: int, orientation: str = "neurological") -> dict[str, str]:
    """The anatomical letters at the edges of a canonical panel sliced along ``axis``.

    Parameters
    ----------
    axis : int
        RAS axis the slices are taken along: 0 sagittal, 1 coronal, 2 axial.
    orientation : {"neurological", "radiological"}
        Neurological: the high end of the horizontal axis (R, or A in sagittal panels) on
        the right; radiological: mirrored left-right in axial and coronal panels, so that the
        patient's right is on the viewer's left. Sagittal panels are the same in both.

    Returns
    -------
    dict
        Letters for ``"left"``, ``"right"``, ``"bottom"`` and ``"top"``.
    """
    axis = _check_axis(axis)
    if orientation not in ("neurological", "radiological"):
        raise ValueError(f"orientation must be 'neurological' or 'radiological', got {orientation!r}")
    horizontal, vertical = (a for a in range(3) if a != axis)
    left, right = _NEGATIVE[horizontal], _POSITIVE[horizontal]
    if orientation == "radiological" and horizontal == 0:
        left, right = right, left
    return {"left": left, "right": right, "bottom": _NEGATIVE[vertical], "top": _POSITIVE[vertical]}

