"""Adapters: every prior source becomes one :class:`~cgc_refine.priors.base.ProbabilityMap`.

The refiner learns from a soft foreground probability. Existing tools hand out many other
things -- a binary mask, a label map, a network's logits, or the anomaly/residual scores of a
VAE or another anomaly detector. Each adapter below maps one such kind to [0, 1] with a
documented, label-free rule; :func:`as_probability_map` dispatches on ``kind`` and, with
``kind="auto"``, infers the kind from the values (:mod:`cgc_refine.priors.encodings`) and logs
what it inferred.

========== ============================================================================
kind       rule
========== ============================================================================
probability validated; values within ``tolerance`` of [0, 1] are clipped
percent    a probability map in percent: divided by 100, then as ``probability``
probability-255
           a probability map stored as 0-255 (e.g. ``uint8(round(p * 255))``): divided by
           255, then as ``probability``
mask       {0, 1} -> {0, 1}; optionally softened by a Gaussian of ``sigma_mm`` and/or a
           label-smoothing ``confidence``
labels     chosen labels (default: every non-zero label) -> 1, others -> 0
logits     ``sigmoid(x / temperature)``
scores     anomaly or residual scores, mapped label-free inside the brain:
           ``"robust"`` (default) -- ``sigmoid(slope * (z - centre))`` with ``z`` the
           robust z-score ``(s - median) / (1.4826 MAD)``; ``centre=3`` puts p = 0.5 three
           robust standard deviations above the median and ``slope=ln 9`` gives p = 0.9 one
           deviation later; ``"mixture"`` -- posterior of the higher-mean component of a
           two-component Gaussian mixture fitted to the scores (for clearly bimodal maps)
========== ============================================================================
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..exceptions import InvalidPriorError
from .base import ProbabilityMap
from .encodings import (  # the constants and infer_prior_kind are re-exported here
    ADAPTER_KINDS,
    AUTO_MAX_LABELS,
    AUTO_TOLERANCE,
    PROBABILITY_SCALES,
    infer_prior_kind,
    infer_reading,
)

__all__ = [
    "ADAPTER_KINDS",
    "FilePrior",
    "as_probability_map",
    "check_prior_informative",
    "from_labels",
    "from_logits",
    "from_mask",
    "from_probability",
    "from_scores",
    "infer_prior_kind",
]

logger = logging.getLogger(__name__)

def _as_float_3d(data: Any, what: str) -> np.ndarray:
    array = np.asarray(data)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InvalidPriorError(f"the {what} must be a 3-D volume, got shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise InvalidPriorError(
            f"the {what} holds {n_bad} NaN/Inf values; fill them (e.g. with 0) before using it "
            "as a prior"
        )
    return array


def from_probability(
    data: Any, affine: np.ndarray | None = None, *, tolerance: float = 1e-3, scale: float = 1.0
) -> ProbabilityMap:
    """Validate a probability map (optionally stored scaled, e.g. in percent or as 0-255).

    Parameters
    ----------
    data : array_like
        3-D foreground probabilities, times ``scale``.
    affine : numpy.ndarray, optional
        Voxel-to-world matrix.
    tolerance : float
        Values within this distance outside [0, 1] (interpolation or rounding overshoot),
        measured after dividing by ``scale``, are clipped; values further out are an error.
    scale : float
        What a probability of 1 is stored as: 1 (default), 100 (percent) or 255 (a byte
        map such as ``uint8(round(p * 255))``). The data are divided by it.

    Raises
    ------
    InvalidPriorError
        For NaN/Inf, a non-positive ``scale``, or values outside
        ``scale * [-tolerance, 1 + tolerance]``.
    """
    if not scale > 0:
        raise InvalidPriorError(f"scale must be positive, got {scale}")
    array = _as_float_3d(data, "probability map")
    if scale != 1.0:
        array = (array.astype(np.float64) / scale).astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if low < -tolerance or high > 1.0 + tolerance:
        stored = "" if scale == 1.0 else f" (after dividing by {scale:g})"
        raise InvalidPriorError(
            f"a probability prior must lie in [0, 1] but spans [{low:.4g}, {high:.4g}]{stored}; "
            "if it holds anomaly scores or logits, pass kind='scores' or kind='logits'"
            + ("" if scale != 1.0 else "; if it is stored in percent or as 0-255, pass "
               "kind='percent' or kind='probability-255'")
        )
    params: dict[str, Any] = {"tolerance": tolerance}
    if scale != 1.0:
        params["scale"] = float(scale)
    return ProbabilityMap(np.clip(array, 0.0, 1.0), affine, "probability", params)


def from_mask(
    data: Any,
    affine: np.ndarray | None = None,
    *,
    sigma_mm: float = 0.0,
    spacing: Sequence[float] | None = None,
    confidence: float = 1.0,
) -> ProbabilityMap:
    """Turn a binary mask into a (optionally softened) probability map.

    Parameters
    ----------
    data : array_like
        3-D mask with values in {0, 1} (booleans and float masks such as 0.99999997 are
        read as ``> 0.5``).
    affine : numpy.ndarray, optional
        Voxel-to-world matrix.
    sigma_mm : float
        Standard deviation, in mm, of a Gaussian blur that softens the mask border
        (0: no blur).
    spacing : sequence of float, optional
        Voxel size in mm, needed to convert ``sigma_mm`` to voxels (default 1 mm).
    confidence : float
        Label smoothing in (0.5, 1]: inside becomes ``confidence``, outside
        ``1 - confidence``.
    """
    array = _as_float_3d(data, "mask")
    if np.any((array > 0.01) & (array < 0.99)) or array.min() < -0.01 or array.max() > 1.01:
        raise InvalidPriorError(
            "a mask prior must hold only 0 and 1; for several labels use kind='labels', "
            "for soft values kind='probability'"
        )
    if not 0.5 < confidence <= 1.0:
        raise InvalidPriorError(f"confidence must be in (0.5, 1], got {confidence}")
    if sigma_mm < 0:
        raise InvalidPriorError(f"sigma_mm must be >= 0, got {sigma_mm}")
    probability = (array > 0.5).astype(np.float32)
    if sigma_mm > 0:
        voxel = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), dtype=np.float64)
        probability = ndimage.gaussian_filter(probability, sigma=sigma_mm / voxel, mode="nearest")
    if confidence < 1.0:
        probability = (1.0 - confidence) + (2.0 * confidence - 1.0) * probability
    params = {"sigma_mm": sigma_mm, "confidence": confidence}
    return ProbabilityMap(np.clip(probability, 0.0, 1.0).astype(np.float32), affine, "mask", params)


def from_labels(
    data: Any, affine: np.ndarray | None = None, *, labels: Sequence[int] | None = None
) -> ProbabilityMap:
    """Select labels of an integer label map as the foreground.

    Parameters
    ----------
    data : array_like
        3-D integer-valued label map.
    affine : numpy.ndarray, optional
        Voxel-to-world matrix.
    labels : sequence of int, optional
        Labels that count as lesion; default every non-zero label (e.g. BraTS whole
        tumour = labels 1, 2, 3, 4).
    """
    array = _as_float_3d(data, "label map")
    if not np.all(array == np.round(array)):
        raise InvalidPriorError(
            "a label map must hold integers; for soft values use kind='probability' or 'scores'"
        )
    present = np.unique(array).astype(np.int64)
    if labels is None:
        chosen = [int(v) for v in present if v != 0]
    else:
        chosen = [int(v) for v in labels]
        missing = sorted(set(chosen) - set(present.tolist()))
        if missing:
            logger.warning("labels %s are not present in the label map (present: %s)", missing, present.tolist())
    probability = np.isin(array.astype(np.int64), chosen).astype(np.float32)
    return ProbabilityMap(probability, affine, "labels", {"labels": chosen})


def from_logits(
    data: Any, affine: np.ndarray | None = None, *, temperature: float = 1.0
) -> ProbabilityMap:
    """Map logits through a (temperature-scaled) sigmoid.

    Parameters
    ----------
    data : array_like
        3-D logits (log-odds of lesion).
    affine : numpy.ndarray, optional
        Voxel-to-world matrix.
    temperature : float
        Positive divisor of the logits before the sigmoid (> 1 softens).
    """
    if temperature <= 0:
        raise InvalidPriorError(f"temperature must be positive, got {temperature}")
    array = _as_float_3d(data, "logit map")
    probability = 0.5 * (1.0 + np.tanh(0.5 * array.astype(np.float64) / temperature))
    return ProbabilityMap(probability.astype(np.float32), affine, "logits", {"temperature": temperature})


def from_scores(
    data: Any,
    affine: np.ndarray | None = None,
    *,
    brain_mask: np.ndarray | None = None,
    method: str = "robust",
    centre: float = 3.0,
    slope: float = float(np.log(9.0)),
) -> ProbabilityMap:
    """Map anomaly or residual scores (higher = more abnormal) to [0, 1], label-free.

    Parameters
    ----------
    data : array_like
        3-D anomaly scores (a VAE residual, an anomaly detector's output, a z-score map).
    affine : numpy.ndarray, optional
        Voxel-to-world matrix.
    brain_mask : numpy.ndarray, optional
        Voxels whose scores define "normal"; default the voxels with a non-zero score (or
        every voxel when none is zero). The output is 0 outside it.
    method : {"robust", "mixture"}
        ``"robust"`` (default): ``sigmoid(slope * (z - centre))`` with the robust z-score
        ``z = (s - median) / (1.4826 * MAD)`` -- the outlier rule for the usual anomaly map,
        a bulk of normal tissue with a small tail of lesions. ``"mixture"``: posterior of the
        higher-mean component of a two-component Gaussian mixture on the scores inside the
        mask (fitted by histogram EM); only for maps whose abnormal mode is a sizeable,
        separate peak, since on a bulk-plus-tail map the second component takes part of the
        bulk. A warning is logged when the mixture's upper component holds more than half of
        the mask, which no lesion map does.

        The default was ``"mixture"`` until a smoothed FLAIR z-score (the residual stand-in
        of ``benchmarks/paper_tables.py``) labelled 22-87 % of the brain of clinical WMH
        cases with it (0.5-12 % with ``"robust"``); the switch was prompted by one such case
        scoring Dice 0.06 against its expert mask (see benchmarks/RESULTS.md).
    centre, slope : float
        Parameters of the ``"robust"`` rule (default: p = 0.5 at z = 3 and p = 0.9 at z = 4).
    """
    from .gmm import fit_histogram_gmm, intensity_histogram

    array = _as_float_3d(data, "score map")
    if brain_mask is None:
        mask = array != 0
        if not mask.any() or mask.all():
            mask = np.ones(array.shape, dtype=bool)
    else:
        mask = np.asarray(brain_mask, dtype=bool)
        if mask.shape != array.shape:
            raise InvalidPriorError(f"brain mask shape {mask.shape} differs from score map {array.shape}")
    values = array[mask]
    if values.size == 0 or float(values.max()) <= float(values.min()):
        raise InvalidPriorError(
            "the score map is constant inside the brain: there is nothing to separate; "
            "check the anomaly detector's output"
        )
    probability = np.zeros(array.shape, dtype=np.float32)
    if method == "mixture":
        centres, counts = intensity_histogram(values, 1024)
        model = fit_histogram_gmm(centres, counts, 2)
        probability[mask] = model.posterior(values)[:, 1]
        if model.weights[1] > 0.5:
            logger.warning(
                "the scores mixture puts %.0f%% of the brain in its upper component, which no "
                "lesion map does; the robust z-score rule (method='robust') suits a "
                "bulk-plus-tail anomaly map", 100 * float(model.weights[1]),
            )
        params: dict[str, Any] = {
            "method": method,
            "means": model.means.tolist(),
            "variances": model.variances.tolist(),
            "weights": model.weights.tolist(),
        }
    elif method == "robust":
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median))) * 1.4826
        if mad <= 0:
            mad = float(values.std())
        z = (values.astype(np.float64) - median) / mad
        probability[mask] = 0.5 * (1.0 + np.tanh(0.5 * slope * (z - centre)))
        params = {"method": method, "median": median, "scale": mad, "centre": centre, "slope": slope}
    else:
        raise InvalidPriorError(f"method must be 'mixture' or 'robust', got {method!r}")
    return ProbabilityMap(probability, affine, "scores", params)


def _auto_kind(data: Any, where: str = "") -> tuple[str, dict[str, Any]]:
    """Infer the kind of ``data`` and say so: a warning unless the reading is beyond doubt
    (exactly {0, 1}, or within [0, 1]), which is logged at INFO. Returns the kind and its
    provenance for ``params``."""
    kind, reason, plain = infer_reading(data)
    prefix = f"'{where}': " if where else ""
    if plain:
        logger.info("%sprior kind inferred from its values: %s -- %s", prefix, kind, reason)
    else:
        logger.warning(
            "%sprior kind inferred from its values: %s -- %s; if it was saved otherwise, pass "
            "--prior-kind (API: kind=...)", prefix, kind, reason,
        )
    return kind, {"kind_inferred": kind, "inference": reason}


def check_prior_informative(prior: ProbabilityMap, brain_mask: np.ndarray | None = None) -> None:
    """Refuse a prior that cannot teach a segmentation: no foreground, or all foreground.

    Raises
    ------
    InvalidPriorError
        When no voxel inside the brain reaches 0.5 (empty prior) or every voxel does
        (full prior).
    """
    values = prior.data if brain_mask is None else prior.data[np.asarray(brain_mask, bool)]
    if values.size == 0 or float(values.max()) < 0.5:
        raise InvalidPriorError(
            "the prior is empty (no voxel reaches probability 0.5 inside the brain): there is "
            "no lesion to refine; check the prior file or choose another prior (e.g. gmm)"
        )
    if float(values.min()) >= 0.5:
        raise InvalidPriorError(
            "the prior marks every brain voxel as lesion (all >= 0.5): it cannot separate "
            "lesion from tissue; check the prior file and the --prior-kind"
        )


def as_probability_map(
    prior: Any,
    affine: np.ndarray | None = None,
    *,
    kind: str = "auto",
    brain_mask: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    reference: Any = None,
    **options: Any,
) -> ProbabilityMap:
    """Convert any prior source into a :class:`ProbabilityMap`.

    Parameters
    ----------
    prior : ProbabilityMap, array_like or path
        The prior. A path is read with :func:`cgc_refine.io.load_array` (and checked against
        ``reference``'s grid when given); a :class:`ProbabilityMap` is returned unchanged.
    affine : numpy.ndarray, optional
        Voxel-to-world matrix of an array prior.
    kind : {"auto", "probability", "percent", "probability-255", "mask", "labels", "logits", "scores"}
        Which adapter to apply; ``"auto"`` uses :func:`infer_prior_kind` and logs the
        result (a warning unless the values are exactly {0, 1} or lie within [0, 1]); the
        reading is recorded in ``params`` (``kind_inferred``, ``inference``). ``"percent"``
        and ``"probability-255"`` are probability maps stored scaled by 100 and 255.
    brain_mask : numpy.ndarray, optional
        Passed to the ``scores`` adapter.
    spacing : sequence of float, optional
        Passed to the ``mask`` adapter (for ``sigma_mm``).
    reference : Volume, optional
        Image whose grid a path prior must share.
    **options
        Adapter options (``tolerance``, ``sigma_mm``, ``confidence``, ``labels``,
        ``temperature``, ``method``, ``centre``, ``slope``).
    """
    if isinstance(prior, ProbabilityMap):
        return prior
    if isinstance(prior, (str, os.PathLike)):
        from ..io import load_array

        array, affine = load_array(prior, reference=reference, name="prior")
        if spacing is None and reference is not None:
            spacing = getattr(reference, "spacing", None)
    else:
        array = np.asarray(prior)
    inferred: dict[str, Any] = {}
    if kind == "auto":
        kind, inferred = _auto_kind(array, os.fspath(prior) if isinstance(prior, (str, os.PathLike)) else "")
    if kind in PROBABILITY_SCALES:
        result = from_probability(array, affine, scale=PROBABILITY_SCALES[kind], **options)
    elif kind == "mask":
        result = from_mask(array, affine, spacing=spacing, **options)
    elif kind == "labels":
        result = from_labels(array, affine, **options)
    elif kind == "logits":
        result = from_logits(array, affine, **options)
    elif kind == "scores":
        result = from_scores(array, affine, brain_mask=brain_mask, **options)
    else:
        raise InvalidPriorError(
            f"unknown prior kind {kind!r}; choose one of auto, {', '.join(ADAPTER_KINDS)}"
        )
    if inferred:
        result = ProbabilityMap(result.data, result.affine, result.source, {**result.params, **inferred})
    return result


def _on_same_grid(volume: Any, data: np.ndarray, affine: np.ndarray) -> bool:
    """Whether a prior array with ``affine`` lies on ``volume``'s voxel grid."""
    from ..exceptions import CGCRefineError
    from ..io import check_same_grid

    try:
        check_same_grid(volume.shape, volume.affine, data.shape, affine)
    except CGCRefineError:
        return False
    return True


class FilePrior:
    """An external prior file of one subject, read through the adapters when needed.

    Holds only the path and the reading rule, so a cohort of prior files can be handed to
    :class:`~cgc_refine.refiner.Refiner` (one per volume) and read subject by subject.

    Parameters
    ----------
    path : path
        NIfTI prior (probability, mask, labels, logits or scores).
    kind : str
        Adapter kind (``"auto"`` infers it from the prior's own values, before any
        resampling, and logs what it inferred).
    resample : bool
        Resample the prior onto the image grid when the grids differ (linear for continuous
        kinds, nearest for masks and labels; outside the prior's field of view: 0 for
        probabilities, masks and labels, the minimum for logits and scores). Without it, a
        grid mismatch is an error.
    on_image_grid : bool
        Take a prior whose array has the image's shape but whose affine differs (a header
        lost when a detector saved its output, e.g. an identity affine) as being on the
        image's voxel grid: voxel (i, j, k) of the prior is voxel (i, j, k) of the image and
        the prior's affine is ignored (recorded in ``params["file"]``). Without it, that
        case is an error that names this option; shapes that differ are always an error
        here (use ``resample`` for priors truly on another grid).
    """

    def __init__(
        self, path: str | os.PathLike[str], kind: str = "auto", resample: bool = False,
        on_image_grid: bool = False,
    ) -> None:
        self.path = path
        self.kind = kind
        self.resample = resample
        self.on_image_grid = on_image_grid

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, as given."""
        return {"path": self.path, "kind": self.kind, "resample": self.resample,
                "on_image_grid": self.on_image_grid}

    def compute(self, volume: Any, brain_mask: np.ndarray | None = None) -> ProbabilityMap:
        """The prior on ``volume``'s grid; ``params`` records the file and any resampling.

        Raises
        ------
        SpaceMismatchError
            When the prior is not on the image's grid and neither ``on_image_grid`` (same
            shape, another affine) nor ``resample`` says what to do about it.
        """
        from ..io import load_array

        path = os.fspath(self.path)
        record: dict[str, Any] = {"path": os.path.abspath(path), "kind_requested": self.kind,
                                  "resampled": False, "on_image_grid": False}
        data, affine = load_array(path, name="prior")
        same_shape = tuple(data.shape) == tuple(volume.shape)
        off_grid = not _on_same_grid(volume, data, affine)
        self._check_grid(path, volume, data, affine, same_shape=same_shape, off_grid=off_grid)
        if off_grid and same_shape and self.on_image_grid:
            logger.warning(
                "prior '%s': its affine differs from the image's but its shape matches; taken as "
                "on the image's voxel grid as asked (its own affine is ignored)", path,
            )
            record.update(on_image_grid=True, prior_affine=np.asarray(affine).tolist())
            result = as_probability_map(data, volume.affine, kind=self.kind, brain_mask=brain_mask,
                                        spacing=volume.spacing)
        elif not self.resample:
            result = as_probability_map(path, kind=self.kind, brain_mask=brain_mask, reference=volume)
        else:
            if off_grid and same_shape:
                logger.warning(
                    "prior '%s' has the image's shape but another affine; resampling it through "
                    "its own affine as --resample-prior asks (if only its header is wrong, use "
                    "--prior-on-image-grid instead)", path,
                )
            result = self._resampled(path, volume, brain_mask, data, affine, off_grid, record)
        return ProbabilityMap(result.data, result.affine, result.source, {**result.params, "file": record})

    def _check_grid(
        self, path: str, volume: Any, data: np.ndarray, affine: np.ndarray, *, same_shape: bool,
        off_grid: bool,
    ) -> None:
        """Refuse a prior whose grid differs from the image's when no option says what to do."""
        from ..exceptions import SpaceMismatchError

        if self.on_image_grid and not same_shape:
            raise SpaceMismatchError(
                f"the prior '{path}' has shape {tuple(data.shape)} but the image has shape "
                f"{tuple(volume.shape)}, so it cannot be on the image's voxel grid; drop "
                "on_image_grid (--prior-on-image-grid) and resample it (--resample-prior)"
            )
        if off_grid and same_shape and not self.on_image_grid and not self.resample:
            raise SpaceMismatchError(
                f"the prior '{path}' has the image's shape {tuple(data.shape)} but a different "
                f"affine (entries differ by up to "
                f"{float(np.abs(np.asarray(affine) - np.asarray(volume.affine)).max()):.4g}), so "
                "its voxels cannot be matched to the image's without a decision. If its voxels "
                "are on the image's grid and only its "
                "header is wrong (a detector that lost the affine when saving), pass "
                "--prior-on-image-grid (API: FilePrior(..., on_image_grid=True)); if it truly "
                "lies on another grid, pass --resample-prior"
            )

    def _resampled(
        self, path: str, volume: Any, brain_mask: np.ndarray | None, data: np.ndarray,
        affine: np.ndarray, off_grid: bool, record: dict[str, Any],
    ) -> ProbabilityMap:
        """The prior read with ``resample``: its kind is decided on its own values, then it is
        resampled onto the image grid when the grids differ (``record`` says how)."""
        kind = self.kind
        inferred: dict[str, Any] = {}
        if kind == "auto":  # decided on the prior's own values, before interpolation
            kind, inferred = _auto_kind(data, path)
        if off_grid:
            import nibabel as nib
            from nibabel.processing import resample_from_to

            order = 0 if kind in ("mask", "labels") else 1
            fill = 0.0 if kind in (*PROBABILITY_SCALES, "mask", "labels") else float(data.min())
            moved = resample_from_to(
                nib.Nifti1Image(data, affine), (volume.shape, volume.affine),
                order=order, mode="constant", cval=fill,
            )
            data = np.asarray(moved.dataobj, dtype=np.float32)
            record.update(resampled=True, resample_order=order, resample_fill=fill)
            logger.info("prior resampled onto the image grid (order %d)", order)
        result = as_probability_map(data, volume.affine, kind=kind, brain_mask=brain_mask,
                                    spacing=volume.spacing)
        return ProbabilityMap(result.data, result.affine, result.source, {**result.params, **inferred})

    def __repr__(self) -> str:
        return (f"FilePrior({os.fspath(self.path)!r}, kind={self.kind!r}, resample={self.resample}, "
                f"on_image_grid={self.on_image_grid})")
