"""Segmentation metrics for binary lesion masks.

Overlap metrics (:func:`dice`, :func:`sensitivity`, :func:`precision`), surface-distance
metrics in millimetres (:func:`hd95`, :func:`assd`), the area under the precision-recall
curve of a probability map (:func:`auprc`), and :func:`evaluate`, which gathers them.

Inputs
------
Masks are array-likes of bool, integer or float values; a voxel is foreground when its value
is ``> 0`` (so label maps count every positive label, and negative values are background).
Float masks must be finite. Both arrays of a comparison must have the same shape, otherwise
:class:`~cgc_refine.exceptions.SpaceMismatchError` is raised. The overlap metrics and
:func:`auprc` are voxel-wise and accept arrays of any dimensionality; the distance metrics need
3-D masks and a ``spacing`` of three positive, finite voxel sizes in millimetres (one per
array axis, in array order), otherwise :class:`~cgc_refine.exceptions.InvalidImageError`
is raised.

Empty-mask policy
-----------------
A ratio whose denominator is zero is decided as follows, and every function says so again:

=================  ================================  ===========================
metric             case                              value
=================  ================================  ===========================
``dice``           prediction and truth both empty   ``1.0`` (perfect agreement)
``dice``           exactly one empty                 ``0.0``
``sensitivity``    truth empty                       ``nan`` (undefined)
``precision``      prediction empty                  ``nan`` (undefined)
``hd95``/``assd``  both empty                        ``0.0``
``hd95``/``assd``  exactly one empty                 ``inf``
``auprc``          truth empty (inside ``mask``)     ``nan`` (undefined)
=================  ================================  ===========================

A prediction that finds nothing where there is a lesion, or finds a lesion where there is
none, is infinitely far from the truth, so ``hd95``/``assd`` are ``inf`` then. Aggregate over
subjects with care: a plain mean is ``inf`` as soon as one case is, and ``nan`` values need
``numpy.nanmean`` or explicit exclusion; report how many cases were undefined or infinite.

Surface distances
-----------------
The surface of a mask is the set of its voxels having at least one face-neighbour (6-
connectivity in 3-D) outside the mask, where positions outside the array count as background:
``mask & ~binary_erosion(mask, face_structure, border_value=0)``. For every surface voxel of
one mask the distance to the nearest surface voxel of the other is read from
``scipy.ndimage.distance_transform_edt(~surface_other, sampling=spacing)``. Both masks are
first cropped to the bounding box of their union plus a one-voxel margin, which leaves every
distance unchanged and makes large volumes cheap.

* :func:`hd95` has two definitions in common use, both offered (``method=``), both with
  ``numpy.percentile``'s linear interpolation:

  - ``"max_directed"`` (the default): the larger of the two directed 95th percentiles,
    ``max(P95(d_AB), P95(d_BA))``; MONAI's ``compute_hausdorff_distance(percentile=95)``.
    It is the default because every HD95 in ``benchmarks/RESULTS.md`` was computed with
    it, and it is the stricter of the two (never below ``"pooled"`` by more than
    interpolation rounding).
  - ``"pooled"``: the 95th percentile of both directed distance sets pooled together,
    ``P95(d_AB ∪ d_BA)``; MedPy's ``medpy.metric.binary.hd95``. It is usually smaller, and
    can be much smaller when one surface is far larger than the other (its many short
    distances dilute the other direction's long ones).

  Name the method when reporting HD95; the two are not interchangeable.
* :func:`assd` is the mean of all distances of both directions pooled together, i.e.
  ``(sum(d_AB) + sum(d_BA)) / (|S_A| + |S_B|)``. Note that MedPy's ``assd`` instead averages
  the two directed means; the two agree when both surfaces have the same number of voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from ._validation import check_spacing
from .exceptions import EmptyMaskError, InvalidImageError, SpaceMismatchError

__all__ = [
    "HD95_METHODS",
    "dice",
    "sensitivity",
    "precision",
    "hd95",
    "assd",
    "auprc",
    "evaluate",
]

#: The HD95 definitions :func:`hd95` offers; the first is the default.
HD95_METHODS = ("max_directed", "pooled")


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _as_mask(array: ArrayLike, name: str) -> np.ndarray:
    """Return a boolean mask (``value > 0``) from an array-like of bool, int or float."""
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return arr > 0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InvalidImageError(
                f"{name} holds {int(arr.size - np.count_nonzero(np.isfinite(arr)))} NaN/Inf "
                "values; a mask must be finite (values > 0 are foreground)"
            )
        return arr > 0
    raise InvalidImageError(
        f"{name} has dtype {arr.dtype}; a mask must hold bool, integer or float values "
        "(values > 0 are foreground)"
    )


def _as_scores(array: ArrayLike, name: str) -> np.ndarray:
    """Return a finite float array of scores (float dtypes kept, others made float64)."""
    arr = np.asarray(array)
    if not (
        arr.dtype == np.bool_
        or np.issubdtype(arr.dtype, np.integer)
        or np.issubdtype(arr.dtype, np.floating)
    ):
        raise InvalidImageError(
            f"{name} has dtype {arr.dtype}; a probability map must hold real numbers"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise InvalidImageError(
            f"{name} holds {int(arr.size - np.count_nonzero(np.isfinite(arr)))} NaN/Inf "
            "values; fix the probability map before computing its AUPRC"
        )
    return arr


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Raise :class:`SpaceMismatchError` unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise SpaceMismatchError(
            f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; "
            "both must lie on the same voxel grid (resample one onto the other first)"
        )


def _pair(pred: ArrayLike, truth: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and binarise a prediction/truth pair of equal shape."""
    p = _as_mask(pred, "pred")
    t = _as_mask(truth, "truth")
    _check_same_shape(p, t, "pred", "truth")
    return p, t


def _check_3d(mask: np.ndarray) -> None:
    """Raise :class:`InvalidImageError` unless ``mask`` is three-dimensional."""
    if mask.ndim != 3:
        raise InvalidImageError(
            f"surface-distance metrics need 3-D masks, got shape {mask.shape}; "
            "add a singleton axis for a single slice"
        )


# --------------------------------------------------------------------------------------------
# overlap metrics
# --------------------------------------------------------------------------------------------


def _counts(p: np.ndarray, t: np.ndarray) -> tuple[int, int, int]:
    """Return ``(TP, FP, FN)`` voxel counts of two boolean masks."""
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return tp, fp, fn


def _dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice from voxel counts; ``1.0`` when both masks are empty."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


def _sensitivity_from_counts(tp: int, fn: int) -> float:
    """Sensitivity from voxel counts; ``nan`` when the truth is empty."""
    return math.nan if tp + fn == 0 else tp / (tp + fn)


def _precision_from_counts(tp: int, fp: int) -> float:
    """Precision from voxel counts; ``nan`` when the prediction is empty."""
    return math.nan if tp + fp == 0 else tp / (tp + fp)


def _overlap_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dice, sensitivity and precision from voxel counts, empty-mask policy included."""
    return {
        "dice": _dice_from_counts(tp, fp, fn),
        "sensitivity": _sensitivity_from_counts(tp, fn),
        "precision": _precision_from_counts(tp, fp),
    }


def _overlap(pred: ArrayLike, truth: ArrayLike) -> dict[str, float]:
    """The overlap metrics of a prediction/truth pair (validated and binarised here)."""
    return _overlap_from_counts(*_counts(*_pair(pred, truth)))


def dice(pred: ArrayLike, truth: ArrayLike) -> float:
    """Dice similarity coefficient ``2TP / (2TP + FP + FN)``.

    Parameters
    ----------
    pred, truth : array-like
        Masks of the same shape; values ``> 0`` are foreground.

    Returns
    -------
    float
        Dice in [0, 1]. Both masks empty gives ``1.0`` (perfect agreement on "no lesion");
        exactly one empty gives ``0.0``.

    Raises
    ------
    SpaceMismatchError
        If the shapes differ.
    InvalidImageError
        If a mask holds NaN/Inf or non-numeric values.
    """
    return _overlap(pred, truth)["dice"]


def sensitivity(pred: ArrayLike, truth: ArrayLike) -> float:
    """Sensitivity (recall, true-positive rate) ``TP / (TP + FN)``.

    Parameters
    ----------
    pred, truth : array-like
        As for :func:`dice`; the ratio is taken over the lesion voxels of ``truth``.

    Returns
    -------
    float
        Sensitivity in [0, 1], or ``nan`` when ``truth`` is empty (there is no lesion to
        find, so the ratio is undefined; exclude such cases or use ``numpy.nanmean``).

    Raises
    ------
    SpaceMismatchError, InvalidImageError
        As :func:`dice`.
    """
    return _overlap(pred, truth)["sensitivity"]


def precision(pred: ArrayLike, truth: ArrayLike) -> float:
    """Precision (positive predictive value) ``TP / (TP + FP)``.

    Parameters
    ----------
    pred, truth : array-like
        As for :func:`dice`. Only the voxels ``pred`` marks enter the ratio.

    Returns
    -------
    float
        Precision in [0, 1], or ``nan`` when ``pred`` is empty (nothing was predicted, so the
        ratio is undefined; exclude such cases or use ``numpy.nanmean``).

    Raises
    ------
    SpaceMismatchError, InvalidImageError
        As :func:`sensitivity`, for the same reasons.
    """
    return _overlap(pred, truth)["precision"]


# --------------------------------------------------------------------------------------------
# surface distances
# --------------------------------------------------------------------------------------------

_FACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one face-neighbour outside the mask (array border = outside)."""
    interior = ndimage.binary_erosion(mask, structure=_FACE_STRUCTURE, border_value=0)
    return mask & ~interior


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop two non-empty masks to their union's bounding box plus a one-voxel margin."""
    union = a | b
    slices = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        present = np.flatnonzero(union.any(axis=other))
        start = max(int(present[0]) - 1, 0)
        stop = min(int(present[-1]) + 2, union.shape[axis])
        slices.append(slice(start, stop))
    box = tuple(slices)
    return a[box], b[box]


def _directed(
    surface_from: np.ndarray, surface_to: np.ndarray, spacing: tuple[float, float, float]
) -> np.ndarray:
    """Distances (mm) from each voxel of ``surface_from`` to the nearest of ``surface_to``."""
    field = ndimage.distance_transform_edt(~surface_to, sampling=spacing)
    return np.asarray(field[surface_from], dtype=np.float64)


def _surface_distances(
    p: np.ndarray,
    t: np.ndarray,
    spacing: tuple[float, float, float],
    crop: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances of two non-empty 3-D boolean masks.

    Parameters
    ----------
    p, t : numpy.ndarray
        Non-empty boolean 3-D masks of equal shape.
    spacing : tuple of float
        Voxel size in millimetres along each axis.
    crop : bool
        Crop to the union's bounding box (plus one voxel) first; the result is the same
        either way, cropping is only faster.

    Returns
    -------
    d_pt, d_tp : numpy.ndarray
        Distances from each surface voxel of ``p`` to the surface of ``t``, and back, in
        C order of the voxels.
    """
    if crop:
        p, t = _crop_to_union(p, t)
    surface_p = _surface(p)
    surface_t = _surface(t)
    return _directed(surface_p, surface_t, spacing), _directed(surface_t, surface_p, spacing)


def _distance_inputs(
    pred: ArrayLike, truth: ArrayLike, spacing: Sequence[float] | ArrayLike
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Validate the inputs of a surface-distance metric."""
    p, t = _pair(pred, truth)
    _check_3d(p)
    return p, t, check_spacing(spacing)


def _check_hd95_method(method: str) -> str:
    if method not in HD95_METHODS:
        raise ValueError(
            f"unknown HD95 method {method!r}; use 'max_directed' (larger of the two directed "
            "95th percentiles, MONAI) or 'pooled' (95th percentile of both directions "
            "together, MedPy)"
        )
    return method


def _percentile95(d_pt: np.ndarray, d_tp: np.ndarray, method: str) -> float:
    """HD95 of two directed distance sets by ``method`` (see the module docstring)."""
    if method == "pooled":
        return float(np.percentile(np.concatenate([d_pt, d_tp]), 95))
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def _distance_metrics(
    p: np.ndarray, t: np.ndarray, spacing: tuple[float, float, float], method: str = "max_directed"
) -> tuple[float, float]:
    """``(hd95, assd)`` of two validated 3-D boolean masks, empty-mask policy included."""
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0, 0.0
    if p_any != t_any:
        return math.inf, math.inf
    d_pt, d_tp = _surface_distances(p, t, spacing)
    hd = _percentile95(d_pt, d_tp, method)
    mean = float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size))
    return hd, mean


def hd95(
    pred: ArrayLike,
    truth: ArrayLike,
    spacing: Sequence[float] | ArrayLike = (1.0, 1.0, 1.0),
    method: str = "max_directed",
) -> float:
    """95th-percentile Hausdorff distance between two mask surfaces, in mm.

    With ``method="max_directed"`` (default) the larger of the two directed 95th
    percentiles (``pred`` surface to ``truth`` surface, and back), as MONAI computes it; with
    ``method="pooled"`` the 95th percentile of both directions' distances together, as
    MedPy's ``hd95`` computes it. Both use ``numpy.percentile``'s linear interpolation.
    Surfaces, distances and the choice of default are described in the module docstring.

    Parameters
    ----------
    pred, truth : array-like
        3-D masks of the same shape; values ``> 0`` are foreground.
    spacing : sequence of 3 float
        Voxel size in millimetres along each array axis (anisotropic spacing is honoured).
    method : {"max_directed", "pooled"}
        The HD95 definition (see above).

    Returns
    -------
    float
        The distance in mm; ``0.0`` when both masks are empty, ``inf`` when exactly one is.

    Raises
    ------
    SpaceMismatchError
        If the shapes differ.
    InvalidImageError
        If a mask is not 3-D or holds NaN/Inf, or ``spacing`` is not three positive numbers.
    ValueError
        If ``method`` is not one of :data:`HD95_METHODS`.
    """
    _check_hd95_method(method)
    p, t, sp = _distance_inputs(pred, truth, spacing)
    return _distance_metrics(p, t, sp, method)[0]


def assd(
    pred: ArrayLike, truth: ArrayLike, spacing: Sequence[float] | ArrayLike = (1.0, 1.0, 1.0)
) -> float:
    """Average symmetric surface distance between two masks, in mm.

    The mean of all surface distances of both directions pooled together,
    ``(sum(d_pred->truth) + sum(d_truth->pred)) / (|S_pred| + |S_truth|)``. Surfaces and
    distances are defined in the module docstring.

    Parameters
    ----------
    pred, truth, spacing
        As for :func:`hd95`.

    Returns
    -------
    float
        The mean distance in mm; like :func:`hd95`, ``0.0`` when both masks are empty and
        ``inf`` when exactly one is.

    Raises
    ------
    SpaceMismatchError, InvalidImageError
        As :func:`hd95`.
    """
    p, t, sp = _distance_inputs(pred, truth, spacing)
    return _distance_metrics(p, t, sp)[1]


# --------------------------------------------------------------------------------------------
# area under the precision-recall curve
# --------------------------------------------------------------------------------------------


def _average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise average precision of 1-D ``scores`` against boolean 1-D ``labels``.

    ``sum_n (R_n - R_{n-1}) P_n`` over the distinct scores taken as thresholds, descending.
    Recall only moves at thresholds equal to the score of some positive voxel, so only those
    terms are summed: at such a threshold ``u`` the recall step is the number of positives
    scoring exactly ``u`` over the number of positives, and the precision is the number of
    positives scoring ``>= u`` over the number of voxels scoring ``>= u``. The latter is read
    from the sorted scores by binary search, which avoids an ``argsort`` of millions of voxels.
    """
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0:
        return math.nan
    ascending = np.sort(scores)
    positives = np.sort(scores[labels])
    # first position of each run of equal positive scores (ascending)
    starts = np.flatnonzero(np.r_[True, positives[1:] != positives[:-1]])
    run_lengths = np.diff(np.r_[starts, n_pos])
    thresholds = positives[starts]
    true_pos = n_pos - starts
    predicted = ascending.size - np.searchsorted(ascending, thresholds, side="left")
    return float(np.sum(run_lengths * (true_pos / predicted)) / n_pos)


def auprc(prob: ArrayLike, truth: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Area under the precision-recall curve of a probability map (average precision).

    Computed step-wise as ``sum_n (R_n - R_{n-1}) P_n`` over the distinct values of ``prob``
    taken as thresholds (``prob >= threshold`` is positive), which is what
    ``sklearn.metrics.average_precision_score`` returns. Voxels with equal values enter
    together. Only the ranking of ``prob`` matters, so scores or logits work as well.

    Parameters
    ----------
    prob : array-like
        Foreground probabilities (any finite real values), same shape as ``truth``.
    truth : array-like
        Reference mask; values ``> 0`` are foreground.
    mask : array-like, optional
        Restricts the evaluation to voxels where ``mask > 0`` (for instance the brain);
        ``truth`` voxels outside it are ignored. Default: every voxel.

    Returns
    -------
    float
        Average precision in [0, 1], or ``nan`` when ``truth`` holds no foreground voxel
        (inside ``mask``), as recall is then undefined.

    Raises
    ------
    SpaceMismatchError
        If the shapes of ``prob``, ``truth`` and ``mask`` differ.
    InvalidImageError
        If ``prob`` or a mask holds NaN/Inf or non-numeric values.
    EmptyMaskError
        If ``mask`` holds no voxel.
    """
    scores = _as_scores(prob, "prob")
    t = _as_mask(truth, "truth")
    _check_same_shape(scores, t, "prob", "truth")
    if mask is None:
        return _average_precision(scores.ravel(), t.ravel())
    m = _as_mask(mask, "mask")
    _check_same_shape(m, t, "mask", "truth")
    if not m.any():
        raise EmptyMaskError(
            "the mask given to auprc holds no voxel; pass mask=None to use every voxel"
        )
    return _average_precision(scores[m], t[m])


# --------------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------------


def evaluate(
    pred: ArrayLike,
    truth: ArrayLike,
    spacing: Sequence[float] | ArrayLike = (1.0, 1.0, 1.0),
    prob: ArrayLike | None = None,
    hd95_method: str = "max_directed",
) -> dict[str, float]:
    """All segmentation metrics of one prediction.

    Parameters
    ----------
    pred, truth : array-like
        3-D masks of the same shape; values ``> 0`` are foreground.
    spacing : sequence of 3 float
        Voxel size in millimetres along each array axis.
    prob : array-like, optional
        Foreground probability map on the same grid; when given, ``"auprc"`` is added.
    hd95_method : {"max_directed", "pooled"}
        The definition of ``"hd95"`` (see :func:`hd95`).

    Returns
    -------
    dict of str to float
        Keys ``"dice"``, ``"sensitivity"``, ``"precision"``, ``"hd95"``, ``"assd"`` and, with
        ``prob``, ``"auprc"``. Empty masks follow the module's policy (``nan`` for undefined
        ratios, ``inf`` for distances to an empty mask).

    Raises
    ------
    SpaceMismatchError, InvalidImageError
        As :func:`hd95` (and :func:`auprc` for ``prob``).
    ValueError
        If ``hd95_method`` is not one of :data:`HD95_METHODS`.
    """
    _check_hd95_method(hd95_method)
    p, t, sp = _distance_inputs(pred, truth, spacing)
    hd, mean = _distance_metrics(p, t, sp, hd95_method)
    result = _overlap_from_counts(*_counts(p, t))
    result.update(hd95=hd, assd=mean)
    if prob is not None:
        result["auprc"] = auprc(prob, t)
    return result
