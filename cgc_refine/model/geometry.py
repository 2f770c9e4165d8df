"""Voxel geometry of the backbone: per-axis down-sampling strides chosen from the voxel spacing.

The paper trains on (near-)isotropic data -- CQ500 resampled to 1x1x1 mm, BraTS at 1 mm --
and down-samples every axis by 2 at each of the 3 levels of the encoder (section 4.3: "After
residual blocks and 3 times down-sampling, we got embedding features z in R^{24x24x8}").
On thick-slice data that rule is wrong: with 0.47x0.47x8 mm voxels one bottleneck voxel covers
3.76x3.76x64 mm, a slab four times thicker than most white-matter lesions are wide, so the
coarse target (the prior average-pooled to the bottleneck, section 3.3.1) and the mini-patch
labels of the fine path (eq. 6) almost never see a lesion.

:func:`anisotropic_strides` chooses, level by level, which axes to halve: the thin axes are
pooled first and a thick axis only once the others have caught up with it (the rule of thumb
of nnU-Net's planning). The remaining functions turn strides into per-axis down-sampling
factors, bottleneck spacings and voxel counts for sizes given in millimetres; all are pure
functions of their arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

from .._validation import check_spacing
from ..exceptions import InvalidGeometryError

__all__ = [
    "InvalidGeometryError",
    "anisotropic_strides",
    "as_factor_triple",
    "bottleneck_spacing",
    "check_strides",
    "downsample_factors",
    "isotropic_strides",
    "voxels_from_mm",
]

#: Relative tolerance of the spacing comparison of :func:`anisotropic_strides`, so that spacings
#: stored as float32 in a NIfTI header (``2.0000001`` for 2 mm) fall on the intended side.
SPACING_RTOL = 1e-5

Strides = tuple[tuple[int, int, int], ...]


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_spacing(spacing: object, name: str = "spacing") -> tuple[float, float, float]:
    """Return ``spacing`` as 3 finite positive floats or raise :class:`InvalidGeometryError`."""
    return check_spacing(spacing, name, error=InvalidGeometryError)


def _check_n_down(n_down: object) -> int:
    if not _is_int(n_down) or int(n_down) < 0:  # type: ignore[call-overload]
        raise InvalidGeometryError(
            f"n_down must be a non-negative integer (the number of down-samplings, "
            f"len(channels) - 1), got {n_down!r}."
        )
    return int(n_down)  # type: ignore[call-overload]


def anisotropic_strides(
    spacing: Sequence[float], n_down: int, ratio: float = 2.0
) -> Strides:
    """Per-axis strides of each down-sampling level, chosen from the voxel spacing.

    The rule, applied level by level for ``k = 1 .. n_down`` starting from the input spacing
    ``s = spacing``:

    1. let ``m = min(s)`` be the finest current spacing;
    2. axis ``a`` gets stride 2 when ``s[a] <= ratio * m`` (up to a relative tolerance of
       :data:`SPACING_RTOL`), otherwise stride 1 -- an axis much coarser than the finest is
       not pooled until the others have caught up with it;
    3. the current spacing is updated, ``s[a] <- s[a] * stride[a]``.

    The finest axis always satisfies the test, so every level halves at least one axis, and
    isotropic spacing gives stride 2 on every axis at every level (the layout of the paper,
    section 4.3). This is the rule of thumb of nnU-Net's experiment planning, with the number
    of levels fixed by the network instead of by the feature-map size.

    Parameters
    ----------
    spacing : sequence of 3 float
        Voxel size in mm along the network's x, y, z axes (the axes of the input tensor).
    n_down : int
        Number of down-sampling levels, ``len(channels) - 1``; 0 gives ``()``.
    ratio : float, optional
        Largest ratio between an axis's spacing and the finest spacing at which that axis is
        still pooled, ``>= 1``. Default 2.0.

    Returns
    -------
    tuple of tuple of 3 int
        ``n_down`` stride triples, each entry 1 or 2, from the first (full resolution) level to
        the bottleneck.

    Raises
    ------
    InvalidGeometryError
        If ``spacing`` is not 3 finite positive numbers, ``n_down`` is not a non-negative
        integer or ``ratio`` is not a finite number ``>= 1``.

    Examples
    --------
    Isotropic voxels are halved on every axis at every level:

    >>> anisotropic_strides((1.0, 1.0, 1.0), 3)
    ((2, 2, 2), (2, 2, 2), (2, 2, 2))

    Thick slices (WMH, 0.47x0.47x8 mm): the in-plane spacing becomes 0.94, 1.88 and 3.76 mm,
    still under half of 8 mm, so the slice axis is never pooled:

    >>> anisotropic_strides((0.47, 0.47, 8.0), 3)
    ((2, 2, 1), (2, 2, 1), (2, 2, 1))

    Moderately thick slices catch up after one level (1 -> 2 mm in-plane; 3 <= 2 * 2):

    >>> anisotropic_strides((1.0, 1.0, 3.0), 3)
    ((2, 2, 1), (2, 2, 2), (2, 2, 2))
    """
    current = list(_check_spacing(spacing))
    n_down = _check_n_down(n_down)
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, Real)
        or not math.isfinite(float(ratio))
        or float(ratio) < 1.0
    ):
        raise InvalidGeometryError(
            f"ratio must be a finite number >= 1 (an axis is pooled while its spacing is at most "
            f"ratio times the finest), got {ratio!r}."
        )
    limit_factor = float(ratio) * (1.0 + SPACING_RTOL)
    strides: list[tuple[int, int, int]] = []
    for _ in range(n_down):
        finest = min(current)
        level = tuple(2 if s <= limit_factor * finest else 1 for s in current)
        current = [s * k for s, k in zip(current, level)]
        strides.append((level[0], level[1], level[2]))
    return tuple(strides)


def isotropic_strides(n_down: int) -> Strides:
    """Stride 2 on every axis at each of ``n_down`` levels (the paper's layout).

    Parameters
    ----------
    n_down : int
        Number of down-sampling levels, ``>= 0``.

    Returns
    -------
    tuple of tuple of 3 int
        ``((2, 2, 2),) * n_down``.
    """
    return ((2, 2, 2),) * _check_n_down(n_down)


def check_strides(strides: object, n_down: int) -> Strides:
    """Validate a per-level stride specification and return it as a tuple of int triples.

    Parameters
    ----------
    strides : sequence of sequence of 3 int
        One ``(sx, sy, sz)`` per down-sampling level, each entry 1 or 2; a level must halve at
        least one axis (an all-ones level would be a level that does not down-sample).
    n_down : int
        Number of down-sampling levels the network has (``len(channels) - 1``).

    Returns
    -------
    tuple of tuple of 3 int
        The strides as plain Python ints.

    Raises
    ------
    InvalidGeometryError
        If ``strides`` is not a sequence of ``n_down`` triples of 1s and 2s, or a level has
        stride 1 on every axis.

    Examples
    --------
    >>> check_strides([[2, 2, 1], [2, 2, 2]], 2)
    ((2, 2, 1), (2, 2, 2))
    """
    n_down = _check_n_down(n_down)
    if hasattr(strides, "tolist") and not isinstance(strides, (str, bytes)):
        strides = strides.tolist()  # a numpy array or tensor of shape (n_down, 3)
    if isinstance(strides, (str, bytes)) or not isinstance(strides, Sequence):
        raise InvalidGeometryError(
            f"strides must be a sequence of {n_down} (sx, sy, sz) triples, one per "
            f"down-sampling level, got {strides!r}."
        )
    if len(strides) != n_down:
        raise InvalidGeometryError(
            f"strides must have one (sx, sy, sz) triple per down-sampling level: the network has "
            f"{n_down} (len(channels) - 1), got {len(strides)}: {strides!r}."
        )
    out: list[tuple[int, int, int]] = []
    for i, level in enumerate(strides):
        if (
            isinstance(level, (str, bytes))
            or not isinstance(level, Sequence)
            or len(level) != 3
            or not all(_is_int(v) and int(v) in (1, 2) for v in level)
        ):
            raise InvalidGeometryError(
                f"strides[{i}] must be 3 integers, each 1 (keep the axis) or 2 (halve it), "
                f"got {level!r}."
            )
        triple = (int(level[0]), int(level[1]), int(level[2]))
        if triple == (1, 1, 1):
            raise InvalidGeometryError(
                f"strides[{i}] is (1, 1, 1): every level must halve at least one axis; use "
                f"fewer channels (levels) instead."
            )
        out.append(triple)
    return tuple(out)


def downsample_factors(strides: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """Per-axis down-sampling factor of the whole encoder: the product of the level strides.

    Parameters
    ----------
    strides : sequence of sequence of 3 int
        Per-level strides, as returned by :func:`anisotropic_strides`.

    Returns
    -------
    tuple of 3 int
        ``(prod_k sx_k, prod_k sy_k, prod_k sz_k)``; ``(1, 1, 1)`` for no level. The input's
        spatial size must be a multiple of it along each axis, and the bottleneck is the input
        size divided by it.

    Raises
    ------
    InvalidGeometryError
        If a level is not a triple of positive integers.

    Examples
    --------
    >>> downsample_factors(((2, 2, 1), (2, 2, 1), (2, 2, 2)))
    (8, 8, 2)
    """
    factors = [1, 1, 1]
    for i, level in enumerate(strides):
        if (
            isinstance(level, (str, bytes))
            or not isinstance(level, Sequence)
            or len(level) != 3
            or not all(_is_int(v) and int(v) >= 1 for v in level)
        ):
            raise InvalidGeometryError(
                f"strides[{i}] must be 3 positive integers, got {level!r}."
            )
        for axis in range(3):
            factors[axis] *= int(level[axis])
    return (factors[0], factors[1], factors[2])


def as_factor_triple(factor: int | Sequence[int], name: str = "factor") -> tuple[int, int, int]:
    """Turn a down-sampling factor given as one int or as a per-axis triple into a triple.

    Parameters
    ----------
    factor : int or sequence of 3 int
        One positive integer used for every axis (the isotropic network), or one per axis
        (:func:`downsample_factors`).
    name : str, optional
        Name of the argument in error messages. Default ``"factor"``.

    Returns
    -------
    tuple of 3 int
        The per-axis factors.

    Raises
    ------
    InvalidGeometryError
        If ``factor`` is neither a positive integer nor 3 positive integers.

    Examples
    --------
    >>> as_factor_triple(8)
    (8, 8, 8)
    >>> as_factor_triple((8, 8, 1))
    (8, 8, 1)
    """
    if _is_int(factor):
        values = [int(factor)] * 3  # type: ignore[call-overload]
    elif not isinstance(factor, (str, bytes)) and isinstance(factor, Sequence) and all(
        _is_int(v) for v in factor
    ):
        values = [int(v) for v in factor]
    else:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise InvalidGeometryError(
            f"{name} must be a positive integer or 3 positive integers (one per axis), "
            f"got {factor!r}."
        )
    return (values[0], values[1], values[2])


def bottleneck_spacing(
    spacing: Sequence[float], strides: Sequence[Sequence[int]]
) -> tuple[float, float, float]:
    """Voxel size in mm of the bottleneck features ``z``.

    Parameters
    ----------
    spacing : sequence of 3 float
        Input voxel size in mm.
    strides : sequence of sequence of 3 int
        Per-level strides of the encoder.

    Returns
    -------
    tuple of 3 float
        ``spacing * downsample_factors(strides)`` per axis.

    Examples
    --------
    >>> bottleneck_spacing((0.5, 0.5, 8.0), anisotropic_strides((0.5, 0.5, 8.0), 3))
    (4.0, 4.0, 8.0)
    """
    s = _check_spacing(spacing)
    f = downsample_factors(strides)
    return (s[0] * f[0], s[1] * f[1], s[2] * f[2])


def voxels_from_mm(
    size_mm: Sequence[float],
    spacing: Sequence[float],
    multiple_of: int | Sequence[int] = 1,
) -> tuple[int, int, int]:
    """Number of voxels spanning a physical size, rounded to a multiple per axis.

    Along each axis ``n = m * max(1, round(size_mm / (spacing * m)))`` with ``m`` the axis's
    entry of ``multiple_of``: the nearest multiple of ``m`` to the physical size, at least
    ``m``. With ``multiple_of = downsample_factors(strides)`` this gives a crop the network
    accepts; with ``spacing = bottleneck_spacing(...)`` and ``multiple_of = 1`` a mini-patch
    size in bottleneck voxels.

    Parameters
    ----------
    size_mm : sequence of 3 float
        Physical extent in mm along x, y, z.
    spacing : sequence of 3 float
        Voxel size in mm.
    multiple_of : int or sequence of 3 int, optional
        Each result is a positive multiple of this (per axis). Default 1.

    Returns
    -------
    tuple of 3 int
        Voxel counts.

    Raises
    ------
    InvalidGeometryError
        If an argument is not 3 finite positive numbers (or a positive integer / triple for
        ``multiple_of``).

    Examples
    --------
    >>> voxels_from_mm((60.0, 60.0, 128.0), (0.47, 0.47, 8.0), multiple_of=(8, 8, 1))
    (128, 128, 16)
    """
    size = _check_spacing(size_mm, "size_mm")
    s = _check_spacing(spacing)
    m = as_factor_triple(multiple_of, "multiple_of")
    return tuple(  # type: ignore[return-value]
        mult * max(1, int(round(length / (vox * mult)))) for length, vox, mult in zip(size, s, m)
    )
