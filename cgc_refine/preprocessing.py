"""Image preprocessing shared by the built-in priors and the network's training data.

:func:`prepare_prior_input` turns a loaded volume (or an array) into normalised channels, a
brain mask and the voxel geometry -- the :class:`PriorInput` that the GMM (paper section 3.2),
Mumford-Shah and outlier priors work on, and that :mod:`cgc_refine.training` feeds the
network. It sits below both (it imports only :mod:`cgc_refine.brain`), so neither has to
import the other to reach it. :mod:`cgc_refine.priors.base` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._utils import jsonable
from .exceptions import EmptyMaskError, InvalidImageError, InvalidPriorError, SpaceMismatchError

__all__ = ["PriorInput", "prepare_prior_input"]

#: MRI standardisations accepted by :func:`prepare_prior_input`.
STANDARDISATIONS = ("iqr", "mode")


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


def _channel_data(
    volume: Any,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """The (C, X, Y, Z) float32 data, the affine and the spacing of a volume or an array."""
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
        raise InvalidImageError(
            f"expected a 3-D volume or (C, X, Y, Z) channels, got shape {data.shape}"
        )
    return data, affine, spacing  # type: ignore[return-value]


def _brain_mask(
    data: np.ndarray, brain_mask: np.ndarray | None, modality: str, bright_channel: int
) -> np.ndarray:
    """The given mask, checked against the image grid, or one derived from the image."""
    from .brain import derive_brain_mask

    if brain_mask is None:
        source = data[bright_channel] if modality == "ct" else data
        return derive_brain_mask(source, modality=modality)  # type: ignore[arg-type]
    mask = np.asarray(brain_mask, dtype=bool)
    if mask.shape != data.shape[1:]:
        raise SpaceMismatchError(
            f"brain mask shape {mask.shape} differs from image shape {data.shape[1:]}; "
            "pass a mask on the image grid"
        )
    if not mask.any():
        raise EmptyMaskError("the brain mask is empty; pass a mask that covers the brain")
    return mask


def _correct_bias(
    data: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    skip: int | None,
    record: list[dict[str, Any]],
) -> np.ndarray:
    """Divide every channel but ``skip`` (the CT channel) by its smooth bias field.

    The per-channel records of :func:`cgc_refine.brain.estimate_bias_field` are appended to
    ``record``; ``data`` is not modified (a corrected copy is returned).
    """
    from .brain import estimate_bias_field

    data = data.copy()
    for index in range(data.shape[0]):
        if index == skip:
            record.append({"applied": False, "reason": "CT channel"})
            continue
        field_map, info = estimate_bias_field(data[index], mask, spacing)
        if field_map is not None:
            data[index] = np.where(mask, data[index] / field_map, data[index])
        record.append(info)
    return data


def _normalise_channels(
    data: np.ndarray, mask: np.ndarray, ct_channel: int | None, standardise: str,
    record: dict[str, Any],
) -> np.ndarray:
    """Window the CT channel and robustly standardise the others inside the brain."""
    from .brain import ct_window, robust_normalise

    channels = np.zeros(data.shape, dtype=np.float32)
    for index in range(data.shape[0]):
        if index == ct_channel:
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
    if ct_channel is not None:
        channels[:, ~mask] = 0.0
    return channels


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

    Raises
    ------
    InvalidImageError
        For an array that is not 3-D or 4-D, or a ``bright_channel`` the image lacks.
    SpaceMismatchError, EmptyMaskError
        For a brain mask off the image grid, or an empty one.
    InvalidPriorError
        For an unknown ``standardise``.
    """
    data, affine, spacing = _channel_data(volume)
    if not 0 <= bright_channel < data.shape[0]:
        raise InvalidImageError(
            f"bright_channel={bright_channel} but the image has {data.shape[0]} channel(s)"
        )
    mask = _brain_mask(data, brain_mask, modality, bright_channel)
    if standardise not in STANDARDISATIONS:
        raise InvalidPriorError(f"standardise must be 'iqr' or 'mode', got {standardise!r}")
    ct_channel = bright_channel if modality == "ct" else None
    record: dict[str, Any] = {"method": standardise, "bias_correction": bool(bias_correction),
                              "bias_field": [], "centre": [], "scale": []}
    if bias_correction:
        data = _correct_bias(data, mask, spacing, ct_channel, record["bias_field"])
    channels = _normalise_channels(data, mask, ct_channel, standardise, record)
    return PriorInput(
        channels=channels, brain_mask=mask, spacing=spacing,
        affine=affine, standardisation=jsonable(record),
    )
