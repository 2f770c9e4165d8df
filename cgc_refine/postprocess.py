"""Turning a refined probability map into a clean binary lesion mask.

Small helpers on NumPy arrays (scipy.ndimage for connected components): thresholding,
removal of connected components below a physical volume, keeping the largest components,
and restricting a map to the brain. Masks are returned as ``uint8`` arrays holding 0 and 1;
inputs are never modified.
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from ._validation import as_3d as _as_3d
from ._validation import check_spacing
from .exceptions import EmptyMaskError, SpaceMismatchError

__all__ = [
    "CONNECTIVITIES",
    "apply_brain_mask",
    "largest_components",
    "remove_small_components",
    "threshold",
]

logger = logging.getLogger(__name__)

#: Neighbourhoods understood by the component functions: 6 (faces), 18 (faces and edges),
#: 26 (faces, edges and corners).
CONNECTIVITIES = (6, 18, 26)

# Relative slack when comparing component volumes with a threshold, so that a component of
# exactly the threshold volume is kept despite floating-point rounding of the spacing.
_VOLUME_RTOL = 1e-9
_SPACING_HINT = "; take them from the image header (nibabel: img.header.get_zooms()[:3])"


def _structure(connectivity: int) -> np.ndarray:
    if isinstance(connectivity, bool) or connectivity not in CONNECTIVITIES:
        raise ValueError(
            f"connectivity must be one of {CONNECTIVITIES} (neighbours sharing a face, "
            f"an edge, or a corner), got {connectivity!r}"
        )
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    return ndimage.generate_binary_structure(3, rank)


def _label(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Label the foreground; return the label image and voxel counts per label (0 first)."""
    labels, n_components = ndimage.label(mask != 0, structure=_structure(connectivity))
    counts = np.bincount(labels.ravel(), minlength=n_components + 1)
    return labels, counts


def threshold(prob: ArrayLike, level: float = 0.5) -> np.ndarray:
    """Binarise a probability map.

    Parameters
    ----------
    prob : array_like
        Probability map (any shape).
    level : float, default 0.5
        Voxels with ``prob >= level`` become foreground; must lie strictly between 0 and 1.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of the same shape holding 0 and 1. NaN voxels become 0 (a warning is
        logged when there are any).

    Raises
    ------
    ValueError
        If ``level`` is not a number in (0, 1).
    """
    if (
        isinstance(level, bool)
        or not isinstance(level, numbers.Real)
        or not math.isfinite(level)
        or not 0.0 < level < 1.0
    ):
        raise ValueError(
            f"level must be a number strictly between 0 and 1, got {level!r}; "
            "0.5 is the usual choice for a probability map"
        )
    data = np.asarray(prob)
    if np.issubdtype(data.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(data)))
        if n_nan:
            logger.warning("threshold: %d NaN voxel(s) in the probability map set to 0", n_nan)
    return (data >= level).astype(np.uint8)


def remove_small_components(
    mask: ArrayLike,
    min_size_mm3: float,
    spacing: Sequence[float],
    connectivity: int = 26,
) -> np.ndarray:
    """Drop connected components whose volume is below a minimum.

    Parameters
    ----------
    mask : array_like
        3-D mask; every non-zero voxel is foreground.
    min_size_mm3 : float
        Smallest volume, in mm³, of a component that is kept. A component of exactly this
        volume is kept. 0 keeps everything.
    spacing : sequence of 3 floats
        Voxel size in mm along each axis; a voxel's volume is their product.
    connectivity : {26, 18, 6}, default 26
        Which neighbours join a component: sharing a corner (26), an edge (18) or a face (6).

    Returns
    -------
    numpy.ndarray
        ``uint8`` mask holding 0 and 1 with the small components removed.

    Raises
    ------
    ValueError
        If ``mask`` is not 3-D, ``min_size_mm3`` is negative or not finite, ``spacing`` is not
        three positive numbers, or ``connectivity`` is not 6, 18 or 26.

    Examples
    --------
    >>> m = np.zeros((5, 5, 5), np.uint8); m[0, 0, 0:3] = 1  # 3 voxels of 1x1x2 mm
    >>> int(remove_small_components(m, 7.0, (1, 1, 2)).sum())
    0
    >>> int(remove_small_components(m, 6.0, (1, 1, 2)).sum())
    3
    """
    data = _as_3d(mask, "mask")
    voxel_mm3 = float(np.prod(check_spacing(spacing, hint=_SPACING_HINT)))
    if (
        isinstance(min_size_mm3, bool)
        or not isinstance(min_size_mm3, numbers.Real)
        or not math.isfinite(min_size_mm3)
        or min_size_mm3 < 0
    ):
        raise ValueError(
            f"min_size_mm3 must be a non-negative volume in mm³, got {min_size_mm3!r}; "
            "pass 0 to keep every component"
        )
    _structure(connectivity)  # validate even when nothing is removed
    if min_size_mm3 == 0:
        return (data != 0).astype(np.uint8)
    labels, counts = _label(data, connectivity)
    n_components = counts.size - 1
    keep = counts * voxel_mm3 >= min_size_mm3 * (1.0 - _VOLUME_RTOL)
    keep[0] = False
    logger.debug(
        "remove_small_components: kept %d of %d component(s) of at least %g mm³",
        int(keep.sum()), n_components, min_size_mm3,
    )
    return keep[labels].astype(np.uint8)


def largest_components(mask: ArrayLike, n: int = 1, connectivity: int = 26) -> np.ndarray:
    """Keep only the ``n`` largest connected components.

    Parameters
    ----------
    mask : array_like
        3-D mask; every non-zero voxel is foreground.
    n : int, default 1
        Number of components to keep (at least 1). All are kept when there are fewer.
        Components of equal size are ranked by their first voxel in C order.
    connectivity : {26, 18, 6}, default 26
        Which neighbours join a component: sharing a corner (26), an edge (18) or a face (6).

    Returns
    -------
    numpy.ndarray
        ``uint8`` mask holding 0 and 1.

    Raises
    ------
    ValueError
        If ``mask`` is not 3-D, ``n`` is not a positive integer, or ``connectivity`` is not
        6, 18 or 26.
    """
    data = _as_3d(mask, "mask")
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        n = 0
    if n < 1:
        raise ValueError(f"n must be a positive integer (components to keep), got {n!r}")
    labels, counts = _label(data, connectivity)
    sizes = counts[1:]
    keep = np.zeros(counts.shape, dtype=bool)
    order = np.argsort(-sizes, kind="stable")[:n]
    keep[order + 1] = True
    return keep[labels].astype(np.uint8)


def apply_brain_mask(mask_or_prob: ArrayLike, brain_mask: ArrayLike) -> np.ndarray:
    """Set every voxel outside the brain to zero.

    Parameters
    ----------
    mask_or_prob : array_like
        Mask or probability map on the image grid.
    brain_mask : array_like
        Brain mask of the same shape; non-zero voxels are inside the brain.

    Returns
    -------
    numpy.ndarray
        A new array of the dtype and shape of ``mask_or_prob``, equal to it inside the brain
        and 0 outside.

    Raises
    ------
    SpaceMismatchError
        If the two arrays differ in shape.
    EmptyMaskError
        If the brain mask holds no voxel.
    """
    data = np.asarray(mask_or_prob)
    brain = np.asarray(brain_mask)
    if data.shape != brain.shape:
        raise SpaceMismatchError(
            f"the brain mask has shape {brain.shape} but the map has shape {data.shape}; "
            "use a brain mask computed on the same image grid (or resample it, order=0)"
        )
    inside = brain != 0
    if not inside.any():
        raise EmptyMaskError(
            "the brain mask holds no voxel, so everything would be erased; "
            "check that the right brain-mask file was given and that it is not empty"
        )
    out = np.array(data, copy=True)
    out[~inside] = 0
    return out
