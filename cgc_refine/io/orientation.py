"""Moving volumes to and from the closest-RAS axis order, exactly (no interpolation).

:func:`to_canonical` and :func:`from_canonical` serve code that wants to work in a fixed
orientation: axes are only permuted and flipped, so the round trip is exact.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import (
    apply_orientation,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from ..exceptions import InvalidImageError, SpaceMismatchError
from ._nifti import _RAS_ORNT, _set_geometry
from .volume import Volume

__all__ = ["from_canonical", "to_canonical"]


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
