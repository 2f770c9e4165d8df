"""Brain masks and intensity handling for MRI and CT.

The toolkit never skull-strips: an MRI is expected to be skull-stripped already (HD-BET,
SynthStrip, BEN...), and its brain mask is then the set of voxels that differ from the
constant background. For head CT a tissue window in Hounsfield units gives the mask. A
given mask always wins over a derived one.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from scipy import ndimage

from .exceptions import EmptyMaskError, InvalidImageError

__all__ = [
    "derive_brain_mask",
    "robust_normalise",
    "ct_window",
    "CT_BRAIN_LEVEL",
    "CT_BRAIN_WIDTH",
]

logger = logging.getLogger(__name__)

#: Brain window level in HU (grey/white matter sit around 20-45 HU).
CT_BRAIN_LEVEL = 40.0
#: Brain window width in HU; acute blood (50-90 HU) stays inside the window.
CT_BRAIN_WIDTH = 100.0

Modality = Literal["mri", "ct"]


def _channels_first(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim == 3:
        return data[None]
    if data.ndim != 4:
        raise InvalidImageError(f"expected a 3-D volume or (C, X, Y, Z) channels, got {data.shape}")
    return data


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def derive_brain_mask(data: np.ndarray, modality: Modality = "mri") -> np.ndarray:
    """Derive a brain mask from an image.

    Parameters
    ----------
    data : numpy.ndarray
        A 3-D volume or channel-first (C, X, Y, Z) volumes on one grid.
    modality : {"mri", "ct"}
        ``"mri"``: the image is skull-stripped; the mask holds the voxels whose value differs,
        in any channel, from that channel's background value (its most frequent value, which
        is 0 for most skull-stripped images and a negative constant for z-scored ones).
        ``"ct"``: channel 0 is in Hounsfield units; the mask is the largest connected
        component of voxels in the soft-tissue range [-15, 100] HU after a one-voxel
        opening, with holes filled (the skull, above ~300 HU, and air are excluded).

    Returns
    -------
    numpy.ndarray
        Boolean mask on the image grid.

    Raises
    ------
    EmptyMaskError
        If no voxel qualifies.
    """
    channels = _channels_first(data)
    if modality == "mri":
        mask = np.zeros(channels.shape[1:], dtype=bool)
        for channel in channels:
            values, counts = np.unique(channel[:: 4, :: 4, :: 2], return_counts=True)
            background = values[np.argmax(counts)]
            if counts.max() < 0.05 * counts.sum():
                # No dominant constant: the image is probably not skull-stripped or is
                # already masked differently; keep every voxel and say so.
                logger.warning(
                    "no constant background found; using the whole field of view as brain "
                    "mask (pass a brain mask for a skull-stripped result)"
                )
                mask[:] = True
                continue
            mask |= channel != background
    elif modality == "ct":
        hu = channels[0]
        tissue = (hu >= -15.0) & (hu <= 100.0)
        tissue = ndimage.binary_opening(tissue, iterations=1)
        mask = ndimage.binary_fill_holes(_largest_component(tissue)) if tissue.any() else tissue
    else:
        raise InvalidImageError(f"modality must be 'mri' or 'ct', got {modality!r}")
    if not mask.any():
        raise EmptyMaskError(
            "the derived brain mask is empty: the image looks constant or holds no tissue; "
            "pass a brain mask explicitly (e.g. from HD-BET or SynthStrip)"
        )
    return np.asarray(mask, dtype=bool)


def robust_normalise(data: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """Robust per-channel standardisation inside the brain.

    Each channel becomes ``(x - median) / (IQR / 1.349)`` computed over brain voxels (for a
    Gaussian, IQR / 1.349 equals the standard deviation, but lesions and outliers barely move
    it); voxels outside the mask are set to 0.

    Parameters
    ----------
    data : numpy.ndarray
        A 3-D volume or channel-first (C, X, Y, Z) volumes.
    brain_mask : numpy.ndarray
        Boolean mask on the same grid.

    Returns
    -------
    numpy.ndarray
        float32 array of shape (C, X, Y, Z).

    Raises
    ------
    EmptyMaskError
        If the mask is empty.
    InvalidImageError
        If a channel is constant inside the mask.
    """
    channels = _channels_first(data).astype(np.float32, copy=False)
    mask = np.asarray(brain_mask, dtype=bool)
    if not mask.any():
        raise EmptyMaskError("the brain mask is empty; pass a mask that covers the brain")
    out = np.zeros(channels.shape, dtype=np.float32)
    for index, channel in enumerate(channels):
        inside = channel[mask]
        q25, median, q75 = np.percentile(inside, [25.0, 50.0, 75.0])
        scale = (q75 - q25) / 1.349
        if not np.isfinite(scale) or scale <= 0:
            scale = float(inside.std())
        if scale <= 0:
            raise InvalidImageError(
                f"channel {index} is constant inside the brain mask; check the image and the mask"
            )
        out[index][mask] = (inside - median) / scale
    return out


def ct_window(
    hu: np.ndarray, level: float = CT_BRAIN_LEVEL, width: float = CT_BRAIN_WIDTH
) -> np.ndarray:
    """Apply a CT display window and scale it to [0, 1].

    Parameters
    ----------
    hu : numpy.ndarray
        Values in Hounsfield units.
    level, width : float
        Window centre and width in HU; the brain window is level 40 HU, width 80-120 HU.

    Returns
    -------
    numpy.ndarray
        float32, 0 at ``level - width/2`` and below, 1 at ``level + width/2`` and above.
    """
    if width <= 0:
        raise InvalidImageError(f"the CT window width must be positive, got {width}")
    low = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / width, 0.0, 1.0)
