"""Residual 3D U-Net: the segmentation backbone of the paper.

Section 3.1 writes the network as an encoder ``E^c`` that maps an image ``x`` to bottleneck
features ``z = E^c(x)`` and a decoder ``D`` that up-samples them back to a voxel-wise lesion
probability ``D(E^c(x))`` (eq. 1). Section 4.3 fixes the depth: "After residual blocks and 3 times
down-sampling, we got embedding features z in R^{24x24x8}" from 192x192x64 training crops.

:class:`ResidualUNet3D` exposes :meth:`~ResidualUNet3D.encode` (``E^c``) and
:meth:`~ResidualUNet3D.decode` (``D``) separately, so that a module can act on the bottleneck
between them, as the cross-granularity contrastive module does (:mod:`cgc_refine.model.cgc`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..exceptions import InvalidImageError, InvalidParameterError
from .blocks import ResidualBlock3D, _check_norm_act, _check_positive_int
from .geometry import check_strides, downsample_factors, isotropic_strides

__all__ = ["ResidualUNet3D"]


def _check_channels(channels: object) -> tuple[int, ...]:
    """Validate the per-level widths of a U-Net and return them as a tuple of ints."""
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise InvalidParameterError(
            f"channels must be a sequence of positive integers (one width per level), "
            f"got {channels!r}."
        )
    if len(channels) < 2:
        raise InvalidParameterError(
            f"channels must name at least 2 levels (len(channels) - 1 down-samplings), "
            f"got {tuple(channels)!r}."
        )
    return tuple(_check_positive_int(c, f"channels[{i}]") for i, c in enumerate(channels))


class ResidualUNet3D(nn.Module):
    """3D U-Net with residual blocks, strided down-sampling and transposed-conv up-sampling.

    Layout, for ``channels = (c0, c1, ..., cn)`` (``n = len(channels) - 1`` down-samplings) and
    per-level strides ``t_i = (sx_i, sy_i, sz_i)`` (default ``(2, 2, 2)`` at every level):

    * stem: ``ResidualBlock3D(in_channels, c0)`` at full resolution (skip 0);
    * encoder level ``i = 1..n``: ``ResidualBlock3D(c(i-1), ci, stride=t_i)`` -- the strided
      3x3x3 convolution of the block divides each spatial dimension by its stride (2 halves
      it, 1 keeps it); levels ``1..n-1`` are skips, level ``n`` is the bottleneck ``z``;
    * decoder level ``i = n..1``: ``ConvTranspose3d(ci, c(i-1), kernel_size=t_i, stride=t_i)``,
      concatenation with skip ``i-1``, ``ResidualBlock3D(2 c(i-1), c(i-1))``;
    * head: 1x1x1 convolution ``c0 -> out_channels`` giving logits.

    With the defaults (``n = 3``, isotropic strides) a 192x192x64 crop gives a 24x24x8
    bottleneck, as in section 4.3 of the paper. On thick-slice data, strides from
    :func:`~cgc_refine.model.geometry.anisotropic_strides` keep the slice axis until the
    in-plane axes have caught up with it: with 0.47x0.47x8 mm voxels, ``((2, 2, 1),) * 3``
    turns a 64x64x16 crop into an 8x8x16 bottleneck of 3.76x3.76x8 mm voxels (instead of
    8x8x2 voxels of 3.76x3.76x64 mm).

    Parameters
    ----------
    in_channels : int
        Number of image channels (modalities), at least 1.
    out_channels : int, optional
        Number of output logit channels. Default 1 (lesion foreground, eq. 1).
    channels : sequence of int, optional
        Width of each resolution level, from full resolution to the bottleneck; at least two
        entries. Default ``(32, 64, 128, 256)``.
    norm : {"instance", "group", "batch"}, optional
        Normalisation used in every block. Default ``"instance"``.
    act : {"leakyrelu", "relu"}, optional
        Activation used in every block. Default ``"leakyrelu"``.
    strides : sequence of sequence of 3 int, optional
        One ``(sx, sy, sz)`` per down-sampling level (``len(channels) - 1`` of them), each entry
        1 or 2, e.g. from :func:`~cgc_refine.model.geometry.anisotropic_strides`. None (default)
        halves every axis at every level, the paper's layout; it builds exactly the layers (and,
        for a given seed, the parameters) of an explicit ``((2, 2, 2),) * n``.

    Attributes
    ----------
    n_down : int
        Number of down-samplings, ``len(channels) - 1``.
    strides : list of list of int
        The per-level strides as plain lists (``[[2, 2, 2], ...]`` by default), ready to be
        stored in a checkpoint and passed back as ``strides``.
    downsample_factors : tuple of 3 int
        Per-axis product of the strides: the input must be a multiple of it along each axis,
        and the bottleneck is the input size divided by it.
    downsample_factor : int
        ``2 ** n_down`` for the isotropic network. In general the largest of
        :attr:`downsample_factors`, which every per-axis factor divides (they are powers of
        2): a size that is a multiple of it on every axis is always accepted; use
        :attr:`downsample_factors` to find the smallest sizes.
    isotropic : bool
        Whether every level halves every axis.

    Raises
    ------
    InvalidParameterError
        If an argument is invalid (non-positive channel count, fewer than 2 levels, unknown
        ``norm``/``act``); :class:`~cgc_refine.model.geometry.InvalidGeometryError` (a
        ``ValueError``) if ``strides`` is not ``len(channels) - 1`` triples of 1s and 2s.

    Examples
    --------
    >>> net = ResidualUNet3D(1, channels=(4, 8, 16, 32))
    >>> z, skips = net.encode(torch.zeros(1, 1, 32, 32, 16))
    >>> tuple(z.shape)
    (1, 32, 4, 4, 2)
    >>> thick = ResidualUNet3D(1, channels=(4, 8, 16, 32), strides=[(2, 2, 1)] * 3)
    >>> thick.downsample_factors
    (8, 8, 1)
    >>> tuple(thick.encode(torch.zeros(1, 1, 32, 32, 16))[0].shape)
    (1, 32, 4, 4, 16)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        norm: str = "instance",
        act: str = "leakyrelu",
        strides: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.out_channels = _check_positive_int(out_channels, "out_channels")
        self.channels = chans = _check_channels(channels)
        norm, act = _check_norm_act(norm, act)
        self.n_down = len(chans) - 1
        level_strides = (
            isotropic_strides(self.n_down)
            if strides is None
            else check_strides(strides, self.n_down)
        )
        self.isotropic = all(t == (2, 2, 2) for t in level_strides)
        self.strides: list[list[int]] = [list(t) for t in level_strides]
        self.downsample_factors = downsample_factors(level_strides)
        self.downsample_factor = max(self.downsample_factors)

        # An isotropic level keeps the int stride/kernel of the original layout (same layers).
        def _conv_stride(t: tuple[int, int, int]) -> int | tuple[int, int, int]:
            return 2 if t == (2, 2, 2) else t

        self.stem = ResidualBlock3D(self.in_channels, chans[0], norm=norm, act=act)
        self.down = nn.ModuleList(
            ResidualBlock3D(
                chans[i - 1], chans[i], stride=_conv_stride(level_strides[i - 1]), norm=norm,
                act=act,
            )
            for i in range(1, len(chans))
        )
        # up[k] / dec[k] bring level n-k back to level n-k-1, undoing that level's stride.
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(
                chans[i],
                chans[i - 1],
                kernel_size=_conv_stride(level_strides[i - 1]),
                stride=_conv_stride(level_strides[i - 1]),
            )
            for i in range(len(chans) - 1, 0, -1)
        )
        self.dec = nn.ModuleList(
            ResidualBlock3D(2 * chans[i - 1], chans[i - 1], norm=norm, act=act)
            for i in range(len(chans) - 1, 0, -1)
        )
        self.head = nn.Conv3d(chans[0], self.out_channels, kernel_size=1)

    @property
    def bottleneck_channels(self) -> int:
        """Number of channels of the bottleneck features ``z``."""
        return self.channels[-1]

    def bottleneck_size(self, spatial_size: Sequence[int]) -> tuple[int, int, int]:
        """Spatial size of ``z`` for an input of spatial size ``spatial_size``.

        Parameters
        ----------
        spatial_size : sequence of 3 int
            Input spatial size ``(X, Y, Z)``; each must be a multiple of its axis's entry of
            :attr:`downsample_factors`.

        Returns
        -------
        tuple of int
            ``(X // fx, Y // fy, Z // fz)`` with ``(fx, fy, fz) = downsample_factors``.

        Raises
        ------
        cgc_refine.exceptions.InvalidImageError
            If a dimension is not a positive multiple of its factor.
        """
        self._check_spatial(tuple(spatial_size))
        f = self.downsample_factors
        return (
            int(spatial_size[0]) // f[0],
            int(spatial_size[1]) // f[1],
            int(spatial_size[2]) // f[2],
        )

    def _check_spatial(self, spatial: tuple[int, ...]) -> None:
        f = self.downsample_factors
        if len(spatial) == 3 and all(
            int(s) >= k and int(s) % k == 0 for s, k in zip(spatial, f)
        ):
            return
        shown = tuple(int(s) for s in spatial)
        if self.isotropic:
            d = self.downsample_factor
            raise InvalidImageError(
                f"input spatial size {shown} is not usable: each of the 3 spatial dimensions "
                f"must be a positive multiple of {d} (= 2**{self.n_down} down-samplings); pad "
                f"or crop the volume to a multiple of {d}."
            )
        raise InvalidImageError(
            f"input spatial size {shown} is not usable: the spatial dimensions (X, Y, Z) must "
            f"be positive multiples of {f} (the per-axis products of the strides "
            f"{self.strides}); pad or crop the volume to such multiples."
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise InvalidImageError(
                f"expected an input of shape (B, {self.in_channels}, X, Y, Z), got a tensor with "
                f"{x.ndim} dimensions of shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise InvalidImageError(
                f"expected {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})."
            )
        self._check_spatial(tuple(x.shape[2:]))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder ``E^c`` of the paper: image to bottleneck features.

        Parameters
        ----------
        x : torch.Tensor
            Image of shape ``(B, in_channels, X, Y, Z)``, each spatial dimension a multiple of
            its entry of :attr:`downsample_factors`.

        Returns
        -------
        z : torch.Tensor
            Bottleneck features, ``(B, channels[-1], X/fx, Y/fy, Z/fz)`` with ``(fx, fy, fz) =
            downsample_factors``.
        skips : list of torch.Tensor
            The ``n_down`` higher-resolution feature maps, from full resolution (``channels[0]``)
            to level ``n_down - 1``, consumed by :meth:`decode`.

        Raises
        ------
        cgc_refine.exceptions.InvalidImageError
            If ``x`` is not 5-D, has the wrong number of channels, or a spatial dimension is
            not a multiple of its entry of :attr:`downsample_factors` (the message gives the
            multiples).
        """
        self._check_input(x)
        h = self.stem(x)
        skips: list[torch.Tensor] = []
        for block in self.down:
            skips.append(h)
            h = block(h)
        return h, skips

    def decode(self, z: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoder ``D`` of the paper: bottleneck features (and skips) to logits.

        Parameters
        ----------
        z : torch.Tensor
            Bottleneck features ``(B, channels[-1], x, y, z)``, possibly modified by a module
            acting at the bottleneck (same shape as returned by :meth:`encode`).
        skips : sequence of torch.Tensor
            The skips returned by :meth:`encode`.

        Returns
        -------
        torch.Tensor
            Logits of shape ``(B, out_channels, X, Y, Z)``.

        Raises
        ------
        InvalidParameterError
            If the number of skips is not ``n_down``.
        """
        if len(skips) != self.n_down:
            raise InvalidParameterError(f"decode expects {self.n_down} skip tensors, got {len(skips)}.")
        h = z
        for k, (up, dec) in enumerate(zip(self.up, self.dec)):
            h = up(h)
            h = dec(torch.cat([h, skips[self.n_down - 1 - k]], dim=1))
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment ``x``: ``D(E^c(x))`` as logits.

        Parameters
        ----------
        x : torch.Tensor
            Image of shape ``(B, in_channels, X, Y, Z)``.

        Returns
        -------
        torch.Tensor
            Logits of shape ``(B, out_channels, X, Y, Z)``; apply a sigmoid for probabilities.
        """
        z, skips = self.encode(x)
        return self.decode(z, skips)
