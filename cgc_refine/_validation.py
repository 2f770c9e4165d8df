"""Argument checks shared by several modules: voxel spacing and 3-D arrays.

Each check raises the error class its caller names (``error=``), so a module keeps raising the
type its users and tests expect (:class:`~cgc_refine.exceptions.InvalidImageError` for image
inputs, :class:`~cgc_refine.model.geometry.InvalidGeometryError` for the network geometry),
while the rule itself is written once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .exceptions import InvalidImageError

__all__ = ["as_3d", "check_spacing"]


def check_spacing(
    spacing: Any,
    name: str = "spacing",
    *,
    error: type[Exception] = InvalidImageError,
    hint: str = "",
) -> tuple[float, float, float]:
    """Return ``spacing`` as three finite positive floats (voxel size in mm along x, y, z).

    Parameters
    ----------
    spacing : sequence of 3 numbers
        A tuple, list or 1-D array. Strings, booleans and nested sequences are refused.
    name : str, default "spacing"
        What the caller calls the argument, for the message.
    error : type of Exception, default InvalidImageError
        The error class raised for a bad value.
    hint : str, optional
        Appended to the message (e.g. where to take the spacing from).

    Returns
    -------
    tuple of 3 float

    Raises
    ------
    error
        If ``spacing`` is not three finite positive numbers.
    """
    values: list[float] = []
    if not isinstance(spacing, (str, bytes)):
        try:
            items = list(spacing)
            if not any(isinstance(v, (bool, np.bool_)) for v in items):
                values = [float(v) for v in items]
        except (TypeError, ValueError):
            values = []
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise error(
            f"{name} must be three finite positive voxel sizes in mm (along x, y, z), "
            f"got {spacing!r}{hint}"
        )
    return (values[0], values[1], values[2])


def as_3d(
    array: Any,
    name: str,
    *,
    first_channel: bool = False,
    error: type[Exception] = InvalidImageError,
) -> np.ndarray:
    """Return ``array`` as a 3-D numpy array (no copy when it is one already).

    Parameters
    ----------
    array : array_like
        The volume.
    name : str
        What the caller calls it, for the message.
    first_channel : bool, default False
        Take the first channel of a channel-first (C, X, Y, Z) array.
    error : type of Exception, default InvalidImageError
        The error class raised for another dimensionality.

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    error
        If the array (after taking the first channel) is not 3-D.
    """
    data = np.asarray(array)
    if first_channel and data.ndim == 4:
        data = data[0]
    if data.ndim != 3:
        accepted = "a 3-D array (or a (C, X, Y, Z) volume)" if first_channel else "a 3-D array"
        raise error(
            f"{name} must be {accepted}, got shape {data.shape}; pass one volume at a time"
        )
    return data
