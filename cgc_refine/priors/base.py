"""The common prior format: a foreground probability map on the image grid.

Every prior source the toolkit understands -- its own GMM and Mumford-Shah priors, a binary
mask, a label map, logits, or the anomaly scores of an external detector -- ends up as one
:class:`ProbabilityMap`. The refiner only ever sees this type, so a new prior source needs
nothing but an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._utils import jsonable
from ..exceptions import InvalidPriorError

__all__ = ["ProbabilityMap", "PRIOR_KINDS", "PriorInput", "prepare_prior_input"]

#: Source kinds a :class:`ProbabilityMap` may record.
PRIOR_KINDS = (
    "probability", "mask", "labels", "logits", "scores", "gmm", "mumford-shah", "outlier",
)


@dataclass(frozen=True)
class ProbabilityMap:
    """A soft pseudo-label: per-voxel foreground (lesion) probability.

    Parameters
    ----------
    data : numpy.ndarray
        Three-dimensional float32 array with values in [0, 1], on the image's voxel grid.
    affine : numpy.ndarray or None
        The (4, 4) voxel-to-world matrix of that grid, when known.
    source : str
        Where the map came from, one of :data:`PRIOR_KINDS`.
    params : dict
        The parameters that produced it (adapter options, mixture settings, fitted values),
        JSON-serialisable, kept for provenance in sidecars and checkpoints.

    Raises
    ------
    InvalidPriorError
        If the array is not 3-D, holds NaN/Inf, or leaves [0, 1].
    """

    data: np.ndarray
    affine: np.ndarray | None = None
    source: str = "probability"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.ndim != 3:
            raise InvalidPriorError(
                f"a probability map must be 3-D, got shape {data.shape}; "
                "pass one volume per subject"
            )
        if not np.issubdtype(data.dtype, np.floating) or data.dtype != np.float32:
            data = data.astype(np.float32)
        if not np.all(np.isfinite(data)):
            raise InvalidPriorError(
                f"the probability map holds {int(np.size(data) - np.isfinite(data).sum())} "
                "NaN/Inf values; fix the prior or convert it with the matching adapter"
            )
        low, high = float(data.min()), float(data.max())
        if low < 0.0 or high > 1.0:
            raise InvalidPriorError(
                f"probability values must lie in [0, 1], found [{low:.4g}, {high:.4g}]; "
                "if these are scores or logits, say so with kind='scores' or kind='logits'"
            )
        if self.source not in PRIOR_KINDS:
            raise InvalidPriorError(
                f"unknown prior source {self.source!r}; expected one of {PRIOR_KINDS}"
            )
        affine = None if self.affine is None else np.asarray(self.affine, dtype=np.float64)
        if affine is not None and affine.shape != (4, 4):
            raise InvalidPriorError(f"affine must be 4x4, got shape {affine.shape}")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "params", jsonable(dict(self.params)))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the map."""
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    def foreground_fraction(self, brain_mask: np.ndarray | None = None) -> float:
        """Expected foreground fraction (mean probability), optionally inside a mask."""
        values = self.data if brain_mask is None else self.data[np.asarray(brain_mask, bool)]
        return float(values.mean()) if values.size else 0.0


@dataclass(frozen=True)
class PriorInput:
    """What a built-in prior works on: normalised channels, the brain mask and the geometry.

    Attributes
    ----------
    channels : numpy.ndarray
        float32 (C, X, Y, Z); MRI channels robustly standardised inside the brain, a CT
        channel windowed to [0, 1] (brain window).
    brain_mask : numpy.ndarray
        Boolean (X, Y, Z).
    spacing : tuple of float
        Voxel size in mm.
    affine : numpy.ndarray or None
        Voxel-to-world matrix.
    standardisation : dict
        How the MRI channels were standardised (``method``, per-channel ``centre`` and
        ``scale`` in the input's units, and the bias-field record ``bias_field``), kept for
        sidecars.
    """

    channels: np.ndarray
    brain_mask: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray | None
    standardisation: dict[str, Any] = field(default_factory=dict)


def prepare_prior_input(
    volume: Any,
    brain_mask: np.ndarray | None = None,
    modality: str = "mri",
    bright_channel: int = 0,
    *,
    standardise: str = "iqr",
    bias_correction: bool = False,
) -> PriorInput:
    """Turn a volume (a :class:`cgc_refine.io.Volume` or an array) into a :class:`PriorInput`.

    Parameters
    ----------
    volume : Volume or numpy.ndarray
        A loaded volume (anything with ``data``, ``affine`` and ``spacing``) or a 3-D /
        channel-first 4-D array (unit spacing, no affine).
    brain_mask : numpy.ndarray, optional
        Boolean mask on the image grid; derived from the image when omitted
        (:func:`cgc_refine.brain.derive_brain_mask`).
    modality : {"mri", "ct"}
        For ``"ct"`` channel ``bright_channel`` is in Hounsfield units: it gives the derived
        brain mask and is mapped through the brain window; other channels are standardised.
    bright_channel : int
        Index of the lesion-bright channel (the CT channel in CT mode).
    standardise : {"iqr", "mode"}
        MRI standardisation inside the brain (see :func:`cgc_refine.brain.robust_normalise`):
        ``"iqr"`` (median and IQR / 1.349, the historical default used by the GMM and
        Mumford-Shah priors and the network input) or ``"mode"`` (the normal-tissue histogram
        peak and its lower half-width, which lesions do not contaminate; the outlier prior).
    bias_correction : bool
        Divide each MRI channel by its estimated smooth multiplicative bias field
        (:func:`cgc_refine.brain.estimate_bias_field`) before standardising. Skipped, and
        recorded as skipped, for a channel that is not strictly positive in the brain
        (already standardised images). Ignored for the CT channel.

    Returns
    -------
    PriorInput
    """
    from ..brain import ct_window, derive_brain_mask, estimate_bias_field, robust_normalise

    if hasattr(volume, "data") and hasattr(volume, "affine"):
        data = np.asarray(volume.data, dtype=np.float32)
        affine = np.asarray(volume.affine, dtype=np.float64)
        spacing = tuple(float(s) for s in getattr(volume, "spacing", (1.0, 1.0, 1.0)))
    else:
        data = np.asarray(volume, dtype=np.float32)
        affine = None
        spacing = (1.0, 1.0, 1.0)
    if data.ndim == 3:
        data = data[None]
    if data.ndim != 4:
        from ..exceptions import InvalidImageError

        raise InvalidImageError(
            f"expected a 3-D volume or (C, X, Y, Z) channels, got shape {data.shape}"
        )
    if not 0 <= bright_channel < data.shape[0]:
        from ..exceptions import InvalidImageError

        raise InvalidImageError(
            f"bright_channel={bright_channel} but the image has {data.shape[0]} channel(s)"
        )
    if brain_mask is None:
        source = data[bright_channel] if modality == "ct" else data
        mask = derive_brain_mask(source, modality=modality)  # type: ignore[arg-type]
    else:
        mask = np.asarray(brain_mask, dtype=bool)
        if mask.shape != data.shape[1:]:
            from ..exceptions import SpaceMismatchError

            raise SpaceMismatchError(
                f"brain mask shape {mask.shape} differs from image shape {data.shape[1:]}; "
                "pass a mask on the image grid"
            )
        if not mask.any():
            from ..exceptions import EmptyMaskError

            raise EmptyMaskError("the brain mask is empty; pass a mask that covers the brain")
    if standardise not in ("iqr", "mode"):
        raise InvalidPriorError(f"standardise must be 'iqr' or 'mode', got {standardise!r}")
    record: dict[str, Any] = {"method": standardise, "bias_correction": bool(bias_correction),
                              "bias_field": [], "centre": [], "scale": []}
    if bias_correction:
        data = data.copy()
        for index in range(data.shape[0]):
            if modality == "ct" and index == bright_channel:
                record["bias_field"].append({"applied": False, "reason": "CT channel"})
                continue
            field_map, info = estimate_bias_field(data[index], mask, spacing)  # type: ignore[arg-type]
            if field_map is not None:
                data[index] = np.where(mask, data[index] / field_map, data[index])
            record["bias_field"].append(info)
    channels = np.zeros(data.shape, dtype=np.float32)
    for index in range(data.shape[0]):
        if modality == "ct" and index == bright_channel:
            channels[index] = ct_window(data[index])
            record["centre"].append(None)
            record["scale"].append(None)
            continue
        normalised, centre, scale = robust_normalise(
            data[index], mask, method=standardise, return_params=True
        )
        channels[index] = normalised[0]
        record["centre"].append(float(centre[0]))
        record["scale"].append(float(scale[0]))
    if modality == "ct":
        channels[:, ~mask] = 0.0
    return PriorInput(
        channels=channels, brain_mask=mask, spacing=spacing,  # type: ignore[arg-type]
        affine=affine, standardisation=jsonable(record),
    )
