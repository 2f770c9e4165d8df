"""Data preparation: one subject as standardised, brain-cropped arrays, and the crop geometry.

A subject is preprocessed once -- channels standardised inside the brain, cropped to the
brain's bounding box, prior and mask alongside -- into a :class:`PreparedSubject` that lives
in memory as tensors (on the training device when they fit) or on disk
(:mod:`cgc_refine.cache`), so a training step costs only the crop, the flips and the network.
:func:`effective_crop_size` and :func:`crop_in_voxels` turn the configured crop and window
(millimetres) into voxels the network can take. No ground truth appears in this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .preprocessing import prepare_prior_input
from .priors.base import ProbabilityMap

__all__ = [
    "BBOX_MARGIN",
    "PreparedSubject",
    "prepare_subject",
    "with_target",
    "effective_crop_size",
    "crop_in_voxels",
]

#: Extra voxels kept around the brain's bounding box.
BBOX_MARGIN = 4


@dataclass
class PreparedSubject:
    """One subject, ready for training or inference.

    Attributes
    ----------
    image : torch.Tensor or array-like
        (C, x, y, z) float32 standardised channels inside the brain bounding box. A subject
        read from a :class:`~cgc_refine.cache.SubjectCache` holds
        :class:`~cgc_refine.cache.MappedArray` views of files instead of tensors (here and
        below); :class:`~cgc_refine.sampling.CropSampler` then reads only the crops, and
        :meth:`to` leaves such a subject where it is.
    prior : torch.Tensor, numpy.ndarray or None
        (1, x, y, z) float32 prior (None at inference).
    brain : torch.Tensor or numpy.ndarray
        (1, x, y, z) bool brain mask.
    bbox : tuple of slice
        Where the box sits in the original grid.
    shape : tuple of int
        Spatial shape of the original grid.
    foreground : numpy.ndarray or array-like
        (n, 3) voxel coordinates (inside the box) where the prior is >= 0.5, for crop
        oversampling; a random subset when there are many.
    info : dict
        JSON-serialisable facts recorded at preparation (the refiner stores the prior's
        provenance and the result of its informativeness check), kept by the cache.
    """

    image: Any
    prior: Any
    brain: Any
    bbox: tuple[slice, slice, slice]
    shape: tuple[int, int, int]
    foreground: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def on_disk(self) -> bool:
        """True for a subject read from the cache (arrays stay on disk)."""
        return not isinstance(self.image, torch.Tensor)

    def to(self, device: torch.device) -> "PreparedSubject":
        """Move the tensors to ``device`` (a disk-backed subject is returned unchanged)."""
        if self.on_disk:
            return self
        return PreparedSubject(
            self.image.to(device),  # type: ignore[union-attr]
            None if self.prior is None else self.prior.to(device),  # type: ignore[union-attr]
            self.brain.to(device), self.bbox, self.shape, self.foreground, self.info,  # type: ignore[union-attr]
        )

    def nbytes(self) -> int:
        """Memory held by the tensors (for a disk-backed subject: the bytes on disk)."""
        if self.on_disk:
            arrays = (self.image, self.brain, self.prior)
            return sum(int(a.nbytes) for a in arrays if a is not None)
        total = self.image.nelement() * 4 + self.brain.nelement()  # type: ignore[union-attr]
        return total + (0 if self.prior is None else self.prior.nelement() * 4)  # type: ignore[union-attr]


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """The box around the mask's voxels, ``margin`` voxels wider on each side (clipped)."""
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        low = max(int(present[0]) - margin, 0)
        high = min(int(present[-1]) + 1 + margin, mask.shape[axis])
        slices.append(slice(low, high))
    return tuple(slices)  # type: ignore[return-value]


def _foreground(target: np.ndarray, max_foreground: int, seed: int) -> np.ndarray:
    """Coordinates where ``target >= 0.5``; a seeded random subset of ``max_foreground`` when more."""
    foreground = np.argwhere(target >= 0.5)
    if len(foreground) > max_foreground:
        rng = np.random.default_rng(seed)
        foreground = foreground[rng.choice(len(foreground), max_foreground, replace=False)]
    return foreground


def prepare_subject(
    volume: Any,
    prior: ProbabilityMap | None,
    brain_mask: np.ndarray | None = None,
    modality: str = "mri",
    *,
    max_foreground: int = 200_000,
    seed: int = 0,
) -> PreparedSubject:
    """Standardise, crop to the brain and pack one subject into tensors.

    Parameters
    ----------
    volume : Volume or numpy.ndarray
        The subject's image(s).
    prior : ProbabilityMap or None
        Pseudo-label on the image grid (None for inference).
    brain_mask : numpy.ndarray, optional
        Boolean brain mask; derived when omitted.
    modality : {"mri", "ct"}
        Intensity handling (see :func:`cgc_refine.preprocessing.prepare_prior_input`).
    max_foreground : int
        Cap on the stored foreground coordinates.
    seed : int
        Seed of that subsample.
    """
    prepared = prepare_prior_input(volume, brain_mask, modality)
    mask = prepared.brain_mask
    box = _bounding_box(mask, BBOX_MARGIN)
    image = torch.from_numpy(np.ascontiguousarray(prepared.channels[(slice(None), *box)]))
    brain = torch.from_numpy(np.ascontiguousarray(mask[box]))[None]
    prior_tensor = None
    foreground = np.zeros((0, 3), dtype=np.int64)
    if prior is not None:
        if prior.shape != mask.shape:
            from .exceptions import SpaceMismatchError

            raise SpaceMismatchError(
                f"prior shape {prior.shape} differs from image shape {mask.shape}; resample the "
                "prior onto the image grid"
            )
        prior_box = np.where(mask, prior.data, 0.0)[box].astype(np.float32)
        prior_tensor = torch.from_numpy(np.ascontiguousarray(prior_box))[None]
        foreground = _foreground(prior_box, max_foreground, seed)
    return PreparedSubject(image, prior_tensor, brain, box, tuple(mask.shape), foreground)  # type: ignore[arg-type]


def with_target(subject: PreparedSubject, target: torch.Tensor, *, seed: int = 0,
                max_foreground: int = 200_000) -> PreparedSubject:
    """The subject with a new (1, x, y, z) training target inside its box; foreground recomputed."""
    foreground = _foreground(np.asarray(target[0].cpu()), max_foreground, seed)
    return PreparedSubject(subject.image, target, subject.brain, subject.bbox, subject.shape, foreground,
                           dict(subject.info))


def effective_crop_size(
    crop_size: Sequence[int], shapes: Sequence[Sequence[int]], factor: int | Sequence[int]
) -> tuple[int, int, int]:
    """The training crop: the configured size, no larger than the biggest subject needs.

    Along each axis ``a`` with factor ``f_a``: ``min(crop, largest extent rounded up to a
    multiple of f_a)``, then rounded down to a multiple of ``f_a`` (at least ``f_a``). Smaller
    subjects are zero-padded to it by the sampler.

    Parameters
    ----------
    crop_size : sequence of 3 int
        Configured crop (or sliding window) size.
    shapes : sequence of sequence of int
        Spatial shapes of the subjects.
    factor : int or sequence of 3 int
        The network's down-sampling factor: one int for every axis (the isotropic network,
        ``2 ** n_down``) or one per axis (``CGCUNet.downsample_factors``, e.g. ``(8, 8, 1)``
        for thick-slice data whose slice axis is not pooled).

    Returns
    -------
    tuple of 3 int
        The crop, a multiple of the factor along each axis.
    """
    from .model.geometry import as_factor_triple

    factors = as_factor_triple(factor)
    crop = []
    for axis in range(3):
        f = factors[axis]
        largest = max(int(s[axis]) for s in shapes)
        needed = int(math.ceil(largest / f) * f)
        size = min(int(crop_size[axis]), needed)
        crop.append(max(f, (size // f) * f))
    return tuple(crop)  # type: ignore[return-value]


def crop_in_voxels(size_mm: Sequence[int], spacing: Sequence[float]) -> tuple[int, int, int]:
    """A crop or window given in millimetres (1 mm voxels) as voxels on a grid of ``spacing``.

    ``RefinerConfig.crop_size`` and ``inference_window`` are written for 1 mm voxels (the
    paper's 192x192x64 on BraTS); on 0.47x0.47x8 mm clinical FLAIR the same field of view is
    about 408x408x8 voxels. Rounded to whole voxels, at least 1 (callers then round to the
    network's per-axis factors with :func:`effective_crop_size`).
    """
    return tuple(max(1, int(round(float(k) / float(s)))) for k, s in zip(size_mm, spacing))  # type: ignore[return-value]
