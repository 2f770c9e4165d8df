"""How a prior array is encoded: the value rules behind ``kind="auto"``.

A prior file may hold a mask, a label map, a probability map (plain, in percent or as 0-255),
logits or anomaly scores. :func:`infer_prior_kind` reads which from the values alone, with
the rules listed in its docstring, and refuses the value ranges that fit more than one common
encoding. The adapters that convert each kind are in :mod:`cgc_refine.priors.adapters`, which
re-exports these names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..exceptions import InvalidPriorError
from . import ADAPTER_KINDS

__all__ = [
    "ADAPTER_KINDS",
    "AUTO_MAX_LABELS",
    "AUTO_TOLERANCE",
    "PROBABILITY_SCALES",
    "infer_prior_kind",
]


#: Divisor that brings each scaled probability kind to [0, 1].
PROBABILITY_SCALES = {"probability": 1.0, "percent": 100.0, "probability-255": 255.0}

#: Distance outside [0, 1] (in probability units, after scaling) that ``kind="auto"`` takes
#: for rounding or interpolation overshoot of a probability map; as ``from_probability``'s
#: default ``tolerance``.
AUTO_TOLERANCE = 1e-3

#: At most this many distinct non-negative integers are read as a label map by
#: ``kind="auto"`` (BraTS uses 4, an aseg-style atlas some 40: too many for a lesion prior).
AUTO_MAX_LABELS = 16

_CHOOSE = ("pass --prior-kind (API: kind=...) with probability, percent, probability-255, mask, "
           "labels, logits or scores to say how to read it")

#: A reading: (kind, the values that decided it, whether it is beyond doubt).
Reading = tuple[str, str, bool]


def _scaled_probability_kind(low: float, high: float) -> str | None:
    """``"percent"`` or ``"probability-255"`` when [low, high] fits that storage of a
    probability map that reaches p >= 0.5 somewhere (as an informative prior must)."""
    for kind in ("percent", "probability-255"):
        scale = PROBABILITY_SCALES[kind]
        if low >= -AUTO_TOLERANCE * scale and 0.5 * scale <= high <= (1.0 + AUTO_TOLERANCE) * scale:
            return kind
    return None


def _scaled_reading(low: float, high: float, found: str, other: str, *, say_range: bool) -> Reading | None:
    """The scaled-probability reading of [low, high], or None when no scale fits.

    ``found`` describes the values, ``other`` says what another reading needs; with
    ``say_range`` the accepted range of the maximum is named too.
    """
    scaled = _scaled_probability_kind(low, high)
    if scaled is None:
        return None
    scale = PROBABILITY_SCALES[scaled]
    if say_range:
        found = f"{found}, a maximum between {0.5 * scale:g} and {scale:g}"
    return (scaled, f"{found}: a probability map stored as 0-{scale:g}, divided by {scale:g}; "
            f"{other}", False)


def _infer_integers(values: np.ndarray, low: float, high: float) -> Reading | None:
    """Rule 3 of :func:`infer_prior_kind`: non-negative integer values."""
    n_values = int(values.size)
    listed = ", ".join(f"{v:g}" for v in values)
    if n_values <= AUTO_MAX_LABELS:
        return ("labels", f"{n_values} integer values ({listed}): a label map, every non-zero "
                "label is lesion; a probability stored as 0-255 or in percent needs "
                "--prior-kind probability-255 or percent", False)
    scaled = _scaled_reading(
        low, high, f"{n_values} distinct integers from {low:g} to {high:g}, too many for "
        "a lesion label map", "a label map with that many labels needs --prior-kind labels",
        say_range=False,
    )
    if scaled is not None:
        return scaled
    if high <= 255.0:
        raise InvalidPriorError(
            f"the prior holds {n_values} distinct integers from {low:g} to {high:g}: too many "
            "for a lesion label map, and not a probability map stored in percent (maximum "
            "50-100) or as 0-255 (maximum 128-255); " + _CHOOSE
        )
    if n_values <= 256:
        return "labels", f"{n_values} integer values from {low:g} to {high:g}: a label map", False
    return None


def _infer_scaled_or_signed(low: float, high: float, span: str) -> Reading | None:
    """Rules 4 and 5 of :func:`infer_prior_kind`: scaled probabilities, and [-1, 1]."""
    if low >= 0.0 - AUTO_TOLERANCE * 255.0 and 1.0 < high <= (1.0 + AUTO_TOLERANCE) * 255.0:
        scaled = _scaled_reading(low, high, span, "anomaly scores in that range need "
                                 "--prior-kind scores", say_range=True)
        if scaled is not None:
            return scaled
        if high > 100.0 * (1.0 + AUTO_TOLERANCE):
            raise InvalidPriorError(
                f"the prior's {span} fit neither a probability in percent (maximum 50-100) nor "
                "one stored as 0-255 that reaches 0.5 (maximum 128-255), and are not clearly "
                "anomaly scores; " + _CHOOSE
            )
    if low >= -1.0 - AUTO_TOLERANCE and high <= 1.0 + AUTO_TOLERANCE:
        raise InvalidPriorError(
            f"the prior's {span} lie in [-1, 1] but leave [0, 1] by more than rounding "
            f"({AUTO_TOLERANCE:g}): a probability rescaled to [-1, 1] (a tanh output), one with "
            "interpolation overshoot, or a signed score, which read very differently; rescale "
            "((x + 1) / 2) or clip it to [0, 1] before using it, or " + _CHOOSE
        )
    return None


def infer_reading(data: Any) -> Reading:
    """The kind of a prior array, why, and whether the reading is beyond doubt.

    Returns
    -------
    kind : str
        One of :data:`ADAPTER_KINDS`.
    reason : str
        The values that decided it, for the log and the sidecar.
    plain : bool
        True for exactly {0, 1} (mask) and values within [0, 1] (probability): readings
        that leave no room for doubt. The others are announced as warnings.

    Raises
    ------
    InvalidPriorError
        For NaN/Inf and for value ranges that fit more than one common encoding.
    """
    array = np.asarray(data)
    sample = array.ravel()[:: max(1, array.size // 2_000_000)]
    if not np.all(np.isfinite(sample)):
        raise InvalidPriorError("the prior holds NaN/Inf values; fill them before using it")
    values = np.unique(sample.astype(np.float64, copy=False))
    if values.size == 0:
        raise InvalidPriorError("the prior holds no voxel; check the prior file")
    low, high = float(values[0]), float(values[-1])
    span = f"values from {low:.4g} to {high:.4g}"
    if values.size <= 2 and set(values.tolist()) <= {0.0, 1.0}:
        return "mask", "only the values 0 and 1", True
    if low >= 0.0 and high <= 1.0:
        return "probability", f"{span}, within [0, 1]", True
    if low >= -AUTO_TOLERANCE and high <= 1.0 + AUTO_TOLERANCE:
        return ("probability", f"{span}: a probability map with a rounding or interpolation "
                f"overshoot of at most {AUTO_TOLERANCE:g} outside [0, 1], clipped to [0, 1]", False)
    reading = None
    if bool(np.all(values == np.round(values))) and low >= 0.0:
        reading = _infer_integers(values, low, high)
    if reading is None:
        reading = _infer_scaled_or_signed(low, high, span)
    if reading is not None:
        return reading
    median = float(np.median(sample))
    if median < -2.0:
        return ("logits", f"{span}, median {median:.3g} < -2: most voxels confidently "
                "background, as a network's logits", False)
    return ("scores", f"{span}: anomaly or residual scores (higher = more abnormal), mapped by "
            "the robust z-score rule", False)


def infer_prior_kind(data: Any) -> str:
    """Guess which adapter a prior array needs.

    Rules, in order (``tol`` = :data:`AUTO_TOLERANCE`):

    1. only 0 and 1 -> ``"mask"``;
    2. values in [0, 1] -> ``"probability"``; in ``[-tol, 1 + tol]`` -> ``"probability"``
       with the overshoot clipped;
    3. non-negative integers: at most :data:`AUTO_MAX_LABELS` distinct values ->
       ``"labels"`` (BraTS 0, 1, 2, 4); more, with a maximum in [50, 100] ->
       ``"percent"`` or in [127.5, 255] -> ``"probability-255"`` (``uint8(round(p * 255))``:
       a lesion prior is not a label map of dozens of labels); other integer maps up to
       255 are refused as ambiguous; above 255, at most 256 distinct values -> ``"labels"``;
    4. other non-negative values (``>= -tol * scale``) with a maximum in [50, 100] ->
       ``"percent"``, in [127.5, 255] -> ``"probability-255"``, in (100, 127.5) -> refused
       as ambiguous;
    5. values in [-1, 1] -> refused (a tanh-scaled probability and a signed score cannot be
       told apart);
    6. a median below -2 (most voxels confidently background, as a network's logits are)
       -> ``"logits"``; anything else -> ``"scores"``.

    The scaled readings need a maximum of at least half the scale: a probability map that
    never reaches p = 0.5 could not be used as a prior anyway.

    Raises
    ------
    InvalidPriorError
        For NaN/Inf, and for the ambiguous ranges above; the message says to choose the kind
        (``--prior-kind``, API ``kind=``).
    """
    return infer_reading(data)[0]
