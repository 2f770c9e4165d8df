"""Intensity augmentation of training crops: the image changes, the target never does.

The built-in priors are functions of the FLAIR intensities, so a network that sees only
those intensities can reproduce the prior -- its errors included -- by learning the prior's
threshold rule. Perturbing the *image* of every crop, channel by channel, with changes that a
scanner makes anyway (a gamma curve, a smooth multiplicative bias field, contrast and
brightness, noise, blur) while keeping the *target* fixed makes that rule useless: the network
has to explain the pseudo-label by shape and context that survive the perturbation. The
spatial augmentations (flips) live in :class:`cgc_refine.sampling.CropSampler`, applied to
image, target and mask alike.

Every transform draws from the NumPy generator it is given, so a seeded sampler stays
reproducible. Crops are standardised intensities (median 0, robust SD 1 inside the brain);
voxels outside the brain (exactly 0 after standardisation, given by ``brain``) stay 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["IntensityAugmentation"]


@dataclass(frozen=True)
class IntensityAugmentation:
    """Random per-channel intensity changes of a training crop.

    Each transform is applied independently with probability ``p`` per channel.

    Attributes
    ----------
    p : float
        Probability of each transform (default 0.3, so most crops get one or two).
    gamma : tuple of float
        Range of the log-uniform gamma exponent, applied to the crop rescaled to [0, 1].
    bias_log_sd : float
        Standard deviation of the log of a smooth multiplicative field (a 3x3x3 random grid,
        trilinearly up-sampled: one slow variation across the crop, as an RF coil gives).
    contrast : tuple of float
        Range of the multiplicative contrast factor about the crop's mean.
    brightness_sd : float
        Standard deviation of an additive shift, in robust SD units.
    noise_sd : tuple of float
        Range of the standard deviation of additive Gaussian noise, in robust SD units.
    blur_sigma : tuple of float
        Range of a Gaussian blur's sigma in voxels.
    """

    p: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    bias_log_sd: float = 0.2
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness_sd: float = 0.2
    noise_sd: tuple[float, float] = (0.0, 0.15)
    blur_sigma: tuple[float, float] = (0.5, 1.0)

    def __call__(self, image: torch.Tensor, brain: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Augment one crop.

        Parameters
        ----------
        image : torch.Tensor
            (C, X, Y, Z) float32 crop.
        brain : torch.Tensor
            (1, X, Y, Z) boolean brain mask of the crop.
        rng : numpy.random.Generator
            Source of every random draw.

        Returns
        -------
        torch.Tensor
            A new (C, X, Y, Z) tensor; the input is not modified.
        """
        inside = brain[0].bool()
        out = image.clone()
        for channel in range(out.shape[0]):
            values = out[channel]
            if rng.random() < self.p:
                values = self._gamma(values, rng)
            if rng.random() < self.p:
                values = values * self._bias_field(values.shape, rng, values.device)
            if rng.random() < self.p:
                mean = values[inside].mean() if bool(inside.any()) else values.mean()
                values = (values - mean) * float(rng.uniform(*self.contrast)) + mean
                values = values + float(rng.normal(0.0, self.brightness_sd))
            if rng.random() < self.p:
                values = _blur(values, float(rng.uniform(*self.blur_sigma)))
            if rng.random() < self.p:
                sd = float(rng.uniform(*self.noise_sd))
                noise = torch.from_numpy(rng.standard_normal(values.shape).astype(np.float32)).to(values.device)
                values = values + sd * noise
            out[channel] = torch.where(inside, values, torch.zeros_like(values))
        return out

    def _gamma(self, values: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        low, high = values.min(), values.max()
        span = (high - low).clamp_min(1e-6)
        exponent = float(np.exp(rng.uniform(np.log(self.gamma[0]), np.log(self.gamma[1]))))
        return ((values - low) / span).clamp(0, 1).pow(exponent) * span + low

    def _bias_field(self, shape: torch.Size, rng: np.random.Generator, device: torch.device) -> torch.Tensor:
        coarse = rng.normal(0.0, self.bias_log_sd, size=(1, 1, 3, 3, 3)).astype(np.float32)
        field = F.interpolate(torch.from_numpy(coarse).to(device), size=tuple(shape), mode="trilinear",
                              align_corners=True)
        return torch.exp(field[0, 0])


def _blur(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a 3-D tensor (sigma in voxels, replicate borders)."""
    radius = max(1, int(round(2 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=values.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = values[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[axis + 2] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]
