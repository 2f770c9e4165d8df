"""Label-free diagnostics of a prior: how much it marks, in how many pieces, and warnings.

A prior the refiner cannot recover from is usually visibly wrong without any ground truth:
it marks nothing, it marks a large part of the brain, or it is a cloud of thousands of
specks. :func:`prior_diagnostics` measures these on the hard prior (``p >= 0.5``) and says so.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..exceptions import SpaceMismatchError

__all__ = [
    "prior_diagnostics",
    "diagnostics_summary",
    "MAX_BRAIN_FRACTION",
    "MAX_COMPONENTS",
    "SPECK_MM3",
]

logger = logging.getLogger(__name__)

#: A prior marking more than this fraction of the brain is implausible: a whole-tumour
#: glioma fills up to about 20 % of the brain, white-matter disease far less.
MAX_BRAIN_FRACTION = 0.30
#: More connected components than this is a cloud of specks, not lesions (even severe MS
#: has tens to a few hundred lesions).
MAX_COMPONENTS = 1000
#: Components smaller than this (mm^3) are counted as specks.
SPECK_MM3 = 10.0


def prior_diagnostics(
    prob: Any,
    brain_mask: np.ndarray | None,
    spacing: Sequence[float] | None = None,
    *,
    params: dict[str, Any] | None = None,
    max_fraction: float = MAX_BRAIN_FRACTION,
    max_components: int = MAX_COMPONENTS,
    log: bool = True,
) -> dict[str, Any]:
    """Label-free summary of a prior and warnings when it looks implausible.

    Parameters
    ----------
    prob : ProbabilityMap or numpy.ndarray
        The prior (values in [0, 1]); ``p >= 0.5`` is the hard prior.
    brain_mask : numpy.ndarray or None
        Boolean brain mask on the same grid (None: the whole volume).
    spacing : sequence of float, optional
        Voxel size in mm (default 1 mm).
    params : dict, optional
        The prior's ``params``; the fitted classes found there (mixture means, weights,
        variances; Mumford-Shah phase means; the outlier prior's tissue mode and scale) are
        copied into ``fitted``. Taken from ``prob.params`` when ``prob`` is a map.
    max_fraction : float
        Warn when the prior marks more than this fraction of the brain.
    max_components : int
        Warn when it has more connected components than this.
    log : bool
        Log the summary (INFO) and each warning (WARNING).

    Returns
    -------
    dict
        ``voxels``, ``volume_ml``, ``brain_volume_ml``, ``percent_of_brain``,
        ``expected_volume_ml`` (sum of probabilities), ``n_components``, ``n_specks``
        (components under :data:`SPECK_MM3`), ``largest_component_ml``, ``fitted`` and
        ``warnings`` (a list of sentences, empty when nothing looks wrong).

    Raises
    ------
    SpaceMismatchError
        If the mask and the prior differ in shape.
    """
    if params is None:
        params = getattr(prob, "params", None)
    data = np.asarray(getattr(prob, "data", prob), dtype=np.float32)
    mask = np.ones(data.shape, bool) if brain_mask is None else np.asarray(brain_mask, dtype=bool)
    if mask.shape != data.shape:
        raise SpaceMismatchError(
            f"brain mask shape {mask.shape} differs from the prior's {data.shape}; pass the "
            "mask of the prior's image"
        )
    voxel = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), np.float64)
    voxel_ml = float(np.prod(voxel)) / 1000.0
    hard = (data >= 0.5) & mask
    n_brain = int(mask.sum())
    n_hard = int(hard.sum())
    labels, n_components = ndimage.label(hard)
    sizes_ml = np.bincount(labels.ravel())[1:] * voxel_ml
    n_specks = int((sizes_ml < SPECK_MM3 / 1000.0).sum())
    fraction = n_hard / n_brain if n_brain else 0.0
    result: dict[str, Any] = {
        "voxels": n_hard,
        "volume_ml": n_hard * voxel_ml,
        "brain_volume_ml": n_brain * voxel_ml,
        "percent_of_brain": 100.0 * fraction,
        "expected_volume_ml": float(data[mask].sum()) * voxel_ml,
        "n_components": int(n_components),
        "n_specks": n_specks,
        "largest_component_ml": float(sizes_ml.max()) if sizes_ml.size else 0.0,
        "fitted": _fitted_classes(params or {}),
        "thresholds": {"max_percent_of_brain": 100.0 * max_fraction,
                       "max_components": int(max_components), "speck_mm3": SPECK_MM3},
    }
    warnings: list[str] = []
    if n_hard == 0:
        warnings.append("the prior is empty: no brain voxel reaches probability 0.5; there is "
                        "nothing to refine (check the image, or try another prior)")
    if fraction > max_fraction:
        warnings.append(f"the prior marks {100 * fraction:.1f}% of the brain, more than the "
                        f"{100 * max_fraction:.0f}% any lesion plausibly fills; it has probably "
                        "taken normal tissue (try the outlier prior or a stricter setting)")
    if n_components > max_components:
        warnings.append(f"the prior has {n_components} connected components ({n_specks} under "
                        f"{SPECK_MM3:g} mm^3): a cloud of specks, not lesions; check for noise "
                        "or a bias field")
    result["warnings"] = warnings
    if log:
        logger.info("prior: %s", diagnostics_summary(result))
        for message in warnings:
            logger.warning("%s", message)
    return result


def diagnostics_summary(diagnostics: dict[str, Any]) -> str:
    """One line for people: marked volume, share of the brain and components."""
    return (f"{diagnostics['volume_ml']:.1f} ml marked (p >= 0.5), "
            f"{diagnostics['percent_of_brain']:.2f}% of the brain, "
            f"{diagnostics['n_components']} component(s), largest "
            f"{diagnostics['largest_component_ml']:.1f} ml")


def _fitted_classes(params: dict[str, Any]) -> dict[str, Any]:
    """The fitted class parameters a prior recorded, whatever its kind."""
    keys = ("K", "means", "variances", "weights", "foreground_decision", "c_fg", "c_bg",
            "tissue_mode", "tissue_scale", "strictness")
    fitted = {k: params[k] for k in keys if k in params}
    if isinstance(fitted.get("foreground_decision"), dict):
        fitted["foreground_decision"] = {
            k: v for k, v in fitted["foreground_decision"].items() if k != "fallback_params"
        }
    return fitted
