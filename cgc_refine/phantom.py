"""Synthetic head phantoms with known lesions, for the demo and the unit tests.

Synthetic phantoms are for exercising code paths, never for claims about accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .io import Volume

__all__ = ["Phantom", "make_phantom", "noisy_prior"]


@dataclass(frozen=True)
class Phantom:
    """A synthetic subject.

    Attributes
    ----------
    volume : Volume
        The image (FLAIR-like for MRI, Hounsfield units for CT), one channel.
    truth : numpy.ndarray
        Boolean lesion mask (for scoring only).
    brain : numpy.ndarray
        Boolean brain mask.
    """

    volume: Volume
    truth: np.ndarray
    brain: np.ndarray


def make_phantom(
    shape: tuple[int, int, int] = (64, 64, 32),
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    n_lesions: int = 3,
    modality: str = "mri",
    noise: float = 0.08,
    seed: int = 0,
    affine: np.ndarray | None = None,
) -> Phantom:
    """Build an ellipsoidal "brain" with white matter, grey-matter rim, ventricles and lesions.

    MRI (FLAIR-like, skull-stripped, background 0): CSF dark (0.2), white matter 0.55, grey
    matter 0.7, lesions bright (1.0-1.15), Gaussian noise and a smooth bias field. CT (HU):
    air -1000, a 1000 HU skull shell, CSF 8, white matter 28, grey matter 38, hyperdense
    lesions (haemorrhage-like) 65-80 HU, noise of 4 HU.

    Parameters
    ----------
    shape, spacing : tuple
        Grid size and voxel size in mm.
    n_lesions : int
        Number of ellipsoidal lesions placed in the white matter.
    modality : {"mri", "ct"}
        Which intensities to draw.
    noise : float
        Noise standard deviation (MRI units; CT uses 4 HU).
    seed : int
        Seed of the random generator.
    affine : numpy.ndarray, optional
        Voxel-to-world matrix (default: diagonal spacing).
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    radii = np.asarray(shape, dtype=np.float64) * np.array([0.42, 0.45, 0.42])
    norm = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    brain = norm <= 1.0
    grey = brain & (norm > 0.8)
    ventricle_radii = radii * np.array([0.18, 0.3, 0.25])
    ventricles = (((grid - centre[:, None, None, None]) / ventricle_radii[:, None, None, None]) ** 2).sum(0) <= 1.0
    truth = np.zeros(shape, dtype=bool)
    lesion_values = []
    for _ in range(n_lesions):
        for _attempt in range(50):
            offset = rng.uniform(-0.5, 0.5, 3) * radii
            size = rng.uniform(0.15, 0.25, 3) * radii
            blob = ((((grid - (centre + offset)[:, None, None, None]) / size[:, None, None, None]) ** 2).sum(0)) <= 1.0
            if (blob & (grey | ventricles)).sum() == 0 and blob.any():
                truth |= blob
                lesion_values.append((blob, rng.uniform(0.0, 1.0)))
                break
    if modality == "mri":
        image = np.zeros(shape, dtype=np.float64)
        image[brain] = 0.55
        image[grey] = 0.7
        image[ventricles & brain] = 0.2
        for blob, u in lesion_values:
            image[blob] = 1.0 + 0.15 * u
        bias = 1.0 + 0.1 * np.sin(grid[0] / shape[0] * np.pi) * np.cos(grid[1] / shape[1] * np.pi)
        image = image * bias + rng.normal(0.0, noise, shape)
        image[~brain] = 0.0
        image = ndimage.gaussian_filter(image, 0.5) * brain
    elif modality == "ct":
        image = np.full(shape, -1000.0)
        skull = (norm > 1.0) & (norm <= 1.15)
        image[skull] = 1000.0
        image[brain] = 28.0
        image[grey] = 38.0
        image[ventricles & brain] = 8.0
        for blob, u in lesion_values:
            image[blob] = 65.0 + 15.0 * u
        image = image + rng.normal(0.0, 4.0, shape) * (image > -500)
    else:
        raise ValueError(f"modality must be 'mri' or 'ct', got {modality!r}")
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    volume = Volume.from_array(image.astype(np.float32), affine=affine)
    return Phantom(volume=volume, truth=truth, brain=brain)


def noisy_prior(
    truth: np.ndarray,
    brain: np.ndarray,
    *,
    flip_fraction: float = 0.15,
    blur: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """A deliberately corrupted soft prior: true lesions with random voxel flips, blurred.

    A fraction ``flip_fraction`` of the brain voxels have their label flipped before the
    blur, so the prior's thresholded Dice is well below 1 while its signal is still there.
    """
    rng = np.random.default_rng(seed)
    labels = truth.astype(np.float64)
    flips = (rng.random(truth.shape) < flip_fraction) & brain
    labels[flips] = 1.0 - labels[flips]
    prior = ndimage.gaussian_filter(labels, blur) if blur > 0 else labels
    return np.clip(np.where(brain, prior, 0.0), 0.0, 1.0).astype(np.float32)
