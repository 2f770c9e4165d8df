"""Networks and losses of the cross-granularity contrastive (CGC) framework.

* :mod:`~cgc_refine.model.blocks` -- :class:`ResidualBlock3D` and layer factories;
* :mod:`~cgc_refine.model.geometry` -- per-axis strides from the voxel spacing
  (:func:`anisotropic_strides`) and the factors, spacings and sizes that follow from them;
* :mod:`~cgc_refine.model.unet` -- :class:`ResidualUNet3D`, the backbone (section 3.1);
* :mod:`~cgc_refine.model.cgc` -- the CGC module and its coarse/fine paths (section 3.3);
* :mod:`~cgc_refine.model.network` -- :class:`CGCUNet`, backbone + CGC module (Fig. 1);
* :mod:`~cgc_refine.model.losses` -- eqs. 1, 6-8.
"""

from __future__ import annotations

from .blocks import ACT_TYPES, NORM_TYPES, ResidualBlock3D, make_act, make_norm
from .cgc import (
    PATCH_SIZES,
    CGCFeatures,
    CGCModule,
    CoarsePath,
    FinePath,
    clip_patch_size,
    patch_lesion_labels,
    patch_means,
)
from .geometry import (
    InvalidGeometryError,
    anisotropic_strides,
    as_factor_triple,
    bottleneck_spacing,
    check_strides,
    downsample_factors,
    isotropic_strides,
    voxels_from_mm,
)
from .losses import (
    CGCLoss,
    PatchSupConLoss,
    downsample_mask,
    downsample_to,
    masked_bce_with_logits,
)
from .network import CGCOutput, CGCUNet
from .unet import ResidualUNet3D

__all__ = [
    "ACT_TYPES",
    "NORM_TYPES",
    "PATCH_SIZES",
    "CGCFeatures",
    "CGCLoss",
    "CGCModule",
    "CGCOutput",
    "CGCUNet",
    "CoarsePath",
    "FinePath",
    "InvalidGeometryError",
    "PatchSupConLoss",
    "ResidualBlock3D",
    "ResidualUNet3D",
    "anisotropic_strides",
    "as_factor_triple",
    "bottleneck_spacing",
    "check_strides",
    "clip_patch_size",
    "downsample_factors",
    "downsample_mask",
    "downsample_to",
    "isotropic_strides",
    "make_act",
    "make_norm",
    "masked_bce_with_logits",
    "patch_lesion_labels",
    "patch_means",
    "voxels_from_mm",
]
