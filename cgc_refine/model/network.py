"""The full network of the paper: residual 3D U-Net with the CGC module at the bottleneck.

Fig. 1 / section 3.1: the encoder ``E^c`` codes the image into bottleneck features ``z``, the
cross-granularity contrastive module (:class:`~cgc_refine.model.cgc.CGCModule`) acts on ``z``,
and the decoder ``D`` up-samples the (enhanced) features to the full-resolution lesion logits
supervised by the prior (eq. 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .cgc import CGCModule
from .unet import ResidualUNet3D

__all__ = ["CGCOutput", "CGCUNet"]


class CGCOutput(NamedTuple):
    """Training-time output of :class:`CGCUNet` (consumed by :class:`~.losses.CGCLoss`).

    Attributes
    ----------
    logits : torch.Tensor
        Full-resolution lesion logits ``(B, 1, X, Y, Z)`` (``L_bce``, eq. 1).
    coarse_logits : torch.Tensor or None
        Coarse lesion logits at bottleneck resolution ``(B, 1, x, y, z)`` (``L^cg_bce``); None
        when the coarse path is off.
    patch_embeddings : torch.Tensor or None
        Unit-norm mini-patch embeddings ``(B, n_patches, proj_dim)`` (``L^fg_cl``, eq. 6); None
        when the fine path is off.
    patch_size : tuple of int or None
        Effective (clipped) mini-patch size in bottleneck voxels used for ``patch_embeddings``;
        the loss tiles the down-sampled prior with it to label the patches.
    bottleneck_size : tuple of int or None
        Spatial size ``(x, y, z)`` of the bottleneck, to which the loss down-samples the prior.
    """

    logits: torch.Tensor
    coarse_logits: torch.Tensor | None = None
    patch_embeddings: torch.Tensor | None = None
    patch_size: tuple[int, int, int] | None = None
    bottleneck_size: tuple[int, int, int] | None = None


class CGCUNet(nn.Module):
    """Residual 3D U-Net with the cross-granularity contrastive module at its bottleneck.

    Parameters
    ----------
    in_channels : int
        Number of image channels, at least 1.
    channels : sequence of int, optional
        Widths of the backbone levels (see :class:`~.unet.ResidualUNet3D`); the default has 3
        down-samplings, so a 192x192x64 crop gives the 24x24x8 bottleneck of section 4.3.
        Default ``(32, 64, 128, 256)``.
    use_coarse : bool, optional
        Enable the coarse-grained path (section 3.3.1). Default True.
    use_fine : bool, optional
        Enable the fine-grained path (section 3.3.2). Default True.
    patch_size : sequence of 3 int, optional
        Fine-path mini-patch size in bottleneck voxels: ``(6, 6, 4)`` (default), ``(12, 12, 4)``
        or ``(3, 3, 2)`` in Table 2; any positive size is accepted.
    proj_dim : int, optional
        Fine-path embedding dimension. Default 128.
    norm : {"instance", "group", "batch"}, optional
        Normalisation layer of every block. Default ``"instance"``.
    act : {"leakyrelu", "relu"}, optional
        Activation of every block. Default ``"leakyrelu"``.
    strides : sequence of sequence of 3 int, optional
        Per-level ``(sx, sy, sz)`` strides of the backbone (see
        :class:`~.unet.ResidualUNet3D`), e.g. from
        :func:`~cgc_refine.model.geometry.anisotropic_strides` for thick-slice data. None
        (default) halves every axis at every level, the paper's layout. ``patch_size`` stays in
        bottleneck voxels whatever the strides, and the losses pool the prior to the bottleneck
        with the per-axis factors (:func:`~.losses.downsample_to`).

    Attributes
    ----------
    backbone : ResidualUNet3D
        The U-Net (encoder ``E^c`` and decoder ``D``).
    cgc : CGCModule
        The module at the bottleneck.
    strides : list of list of int
        The backbone's per-level strides (plain lists, for a checkpoint).
    downsample_factors : tuple of 3 int
        Per-axis down-sampling factor; input spatial sizes must be multiples of it per axis.
    downsample_factor : int
        ``2 ** n_down`` for the default strides; in general the largest per-axis factor (a
        size that is a multiple of it on every axis is always accepted).

    Notes
    -----
    The backbone is built before the CGC module and a disabled path creates no parameter, so
    with ``use_coarse=False, use_fine=False`` the network is exactly a
    :class:`~.unet.ResidualUNet3D` (same parameters for the same seed, same output): the
    "Backbone + P" ablation of Table 2.

    Examples
    --------
    >>> net = CGCUNet(1, channels=(4, 8, 16, 32), proj_dim=8)
    >>> net(torch.zeros(1, 1, 32, 32, 16)).shape
    torch.Size([1, 1, 32, 32, 16])
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        use_coarse: bool = True,
        use_fine: bool = True,
        patch_size: Sequence[int] = (6, 6, 4),
        proj_dim: int = 128,
        norm: str = "instance",
        act: str = "leakyrelu",
        strides: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = ResidualUNet3D(
            in_channels, out_channels=1, channels=channels, norm=norm, act=act, strides=strides
        )
        self.cgc = CGCModule(
            self.backbone.bottleneck_channels,
            use_coarse=use_coarse,
            use_fine=use_fine,
            patch_size=patch_size,
            proj_dim=proj_dim,
            norm=norm,
            act=act,
        )
        self.in_channels = self.backbone.in_channels
        self.downsample_factor = self.backbone.downsample_factor
        self.downsample_factors = self.backbone.downsample_factors
        self.strides = self.backbone.strides
        self.use_coarse = use_coarse
        self.use_fine = use_fine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution lesion logits (inference; drops into sliding-window inference).

        The fine path, a training signal only, is skipped.

        Parameters
        ----------
        x : torch.Tensor
            Image ``(B, in_channels, X, Y, Z)``, spatial sizes multiples of
            :attr:`downsample_factors` (per axis).

        Returns
        -------
        torch.Tensor
            Logits ``(B, 1, X, Y, Z)``.
        """
        z, skips = self.backbone.encode(x)
        return self.backbone.decode(self.cgc.fuse(z), skips)

    def forward_train(self, x: torch.Tensor) -> CGCOutput:
        """Logits plus the auxiliary outputs needed by the training loss (eq. 8).

        Parameters
        ----------
        x : torch.Tensor
            Image ``(B, in_channels, X, Y, Z)``.

        Returns
        -------
        CGCOutput
            Full-resolution logits, coarse logits (or None), patch embeddings (or None), the
            effective patch size and the bottleneck size.
        """
        z, skips = self.backbone.encode(x)
        feats = self.cgc(z)
        logits = self.backbone.decode(feats.features, skips)
        bottleneck = (int(z.shape[2]), int(z.shape[3]), int(z.shape[4]))
        return CGCOutput(
            logits=logits,
            coarse_logits=feats.coarse_logits,
            patch_embeddings=feats.patch_embeddings,
            patch_size=feats.patch_size,
            bottleneck_size=bottleneck,
        )
