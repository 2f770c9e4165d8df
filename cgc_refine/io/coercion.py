"""Input coercion: turn paths, arrays and :class:`~cgc_refine.io.Volume` objects into volumes and masks.

The estimator and the workflow accept images and masks in several forms (a file path or a
sequence of paths, a ``(C, X, Y, Z)`` or ``(X, Y, Z)`` array, an ``(array, affine)`` pair, a
:class:`~cgc_refine.io.Volume`). The functions of this module bring each form to one
representation, so callers need not repeat the checks. Everything public here is re-exported
from :mod:`cgc_refine.io`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..exceptions import InvalidImageError, SpaceMismatchError
from .reading import load_mask, load_volume
from .volume import Volume

__all__ = ["as_volume", "as_brain_mask"]


def as_volume(volume: Any) -> Volume:
    """A :class:`Volume` from any accepted form of an image.

    Parameters
    ----------
    volume : path, sequence of paths, Volume, numpy.ndarray or (array, affine)
        A file, one file per modality (read by :func:`load_volume`), a volume (returned as
        it is), an array (identity affine) or an array with its affine.

    Raises
    ------
    InvalidImageError
        If ``volume`` is none of these (or the files cannot be read).
    """
    if isinstance(volume, Volume):
        return volume
    if isinstance(volume, (str, os.PathLike)):
        return load_volume(volume)
    if isinstance(volume, (list, tuple)) and volume and all(isinstance(v, (str, os.PathLike)) for v in volume):
        return load_volume(list(volume))
    if isinstance(volume, tuple) and len(volume) == 2:
        data, affine = volume
        return Volume.from_array(np.asarray(data), affine=np.asarray(affine))
    if isinstance(volume, np.ndarray):
        return Volume.from_array(volume)
    raise InvalidImageError(
        f"cannot read a volume from {type(volume).__name__}; pass a path, a list of paths "
        "(modalities), a cgc_refine.io.Volume, an array, or an (array, affine) pair"
    )


def as_brain_mask(mask: Any, volume: Volume) -> np.ndarray | None:
    """A boolean brain mask on ``volume``'s grid, or None when no mask is given.

    Parameters
    ----------
    mask : path, array or None
        A mask file (read by :func:`load_mask` against ``volume``), or an array (boolean, or
        values thresholded at 0.5).
    volume : Volume
        The image the mask belongs to.

    Raises
    ------
    SpaceMismatchError
        If an array's shape is not the image's.
    """
    if mask is None:
        return None
    if isinstance(mask, (str, os.PathLike)):
        return load_mask(mask, reference=volume)
    array = np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)
    if array.shape != tuple(volume.shape):
        raise SpaceMismatchError(f"brain mask shape {array.shape} differs from image shape {tuple(volume.shape)}")
    return array
