"""Cross-granularity contrastive (CGC) module of the paper, section 3.3 and Fig. 1.

The module acts on the bottleneck features ``z = E^c(x)`` of the backbone and has two paths,
each of which can be switched off for the ablations of Table 2 (section 5.2.1):

* the **coarse-grained path** (:class:`CoarsePath`, section 3.3.1) predicts a coarse lesion map
  ``p`` at bottleneck resolution (a residual block followed by a 1x1x1 convolution, supervised
  by ``L^cg_bce`` against the down-sampled prior) and splits ``z`` into lesion regions
  ``r^lesion = p (x) z`` and normal-tissue regions ``r^normal = (1 - p) (x) z``;
* the **fine-grained path** (:class:`FinePath`, section 3.3.2) splits ``z`` into
  non-overlapping mini-patches and embeds each with a small projection head; the embeddings are
  contrasted by the supervised contrastive loss of eq. 6
  (:class:`cgc_refine.model.losses.PatchSupConLoss`), with the lesion patches ``Omega+`` decided
  by :func:`patch_lesion_labels`.

How the two regions of the coarse path re-enter the network is not written in the text; our
reading of Fig. 1 is that they are fused back into the features handed to the decoder::

    z' = z + conv1x1(cat(p (x) z, (1 - p) (x) z))

so that the decoder sees the lesion/normal disentanglement, and with the coarse path disabled
the decoder sees ``z`` unchanged. The fine path is a training signal only: it reads ``z`` and
does not change the decoder input.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import InvalidParameterError
from .blocks import ResidualBlock3D, _check_norm_act, _check_positive_int

__all__ = [
    "CoarsePath",
    "FinePath",
    "CGCModule",
    "CGCFeatures",
    "PATCH_SIZES",
    "clip_patch_size",
    "patch_means",
    "patch_lesion_labels",
]

#: Mini-patch sizes (in bottleneck voxels) studied in section 5.2.1 / Table 2 of the paper; the
#: default is (6, 6, 4). Any positive size is accepted.
PATCH_SIZES: tuple[tuple[int, int, int], ...] = ((12, 12, 4), (6, 6, 4), (3, 3, 2))


def _check_patch_size(patch_size: object) -> tuple[int, int, int]:
    """Validate a 3D mini-patch size and return it as a tuple of 3 ints."""
    if isinstance(patch_size, (str, bytes)) or not isinstance(patch_size, Sequence):
        raise InvalidParameterError(
            f"patch_size must be a sequence of 3 positive integers, got {patch_size!r}."
        )
    if len(patch_size) != 3:
        raise InvalidParameterError(
            f"patch_size must have 3 entries (one per spatial axis), got {tuple(patch_size)!r}."
        )
    p = tuple(_check_positive_int(s, f"patch_size[{i}]") for i, s in enumerate(patch_size))
    return (p[0], p[1], p[2])


def clip_patch_size(
    patch_size: Sequence[int], spatial_size: Sequence[int]
) -> tuple[int, int, int]:
    """Mini-patch size actually used on a bottleneck of a given spatial size.

    Along every axis where the bottleneck is smaller than the requested patch (small crops, e.g.
    on CPU) the patch is clipped to the bottleneck size. Where the bottleneck is not a multiple
    of the patch, the remainder at the high end of the axis is dropped (it belongs to no
    mini-patch), as :func:`torch.nn.functional.avg_pool3d` does.

    Parameters
    ----------
    patch_size : sequence of 3 int
        Requested mini-patch size in bottleneck voxels, e.g. ``(6, 6, 4)``.
    spatial_size : sequence of 3 int
        Spatial size of the bottleneck.

    Returns
    -------
    tuple of 3 int
        ``min(patch_size[a], spatial_size[a])`` for each axis ``a``.

    Examples
    --------
    >>> clip_patch_size((6, 6, 4), (4, 4, 2))
    (4, 4, 2)
    """
    p = _check_patch_size(patch_size)
    if len(spatial_size) != 3:
        raise InvalidParameterError(f"spatial_size must have 3 entries, got {tuple(spatial_size)!r}.")
    s = tuple(_check_positive_int(int(v), f"spatial_size[{i}]") for i, v in enumerate(spatial_size))
    return (min(p[0], s[0]), min(p[1], s[1]), min(p[2], s[2]))


def patch_means(volume: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Average a bottleneck-resolution map over every mini-patch.

    The patch grid and its order are the ones used by :class:`FinePath`: patches are taken
    without overlap from the origin, the patch size is clipped with :func:`clip_patch_size`, any
    remainder is dropped, and patches are numbered in C order of the patch grid
    (``index = (ix * ny + iy) * nz + iz``).

    Parameters
    ----------
    volume : torch.Tensor
        Map of shape ``(B, C, x, y, z)`` (e.g. the down-sampled prior, ``C = 1``).
    patch_size : sequence of 3 int
        Requested mini-patch size in bottleneck voxels.

    Returns
    -------
    torch.Tensor
        Float32 tensor of shape ``(B, C, n_patches)`` with the mean of ``volume`` over each
        mini-patch.
    """
    if volume.ndim != 5:
        raise InvalidParameterError(f"expected a (B, C, x, y, z) tensor, got shape {tuple(volume.shape)}.")
    ps = clip_patch_size(patch_size, volume.shape[2:])
    pooled = F.avg_pool3d(volume.float(), kernel_size=ps, stride=ps)
    return pooled.flatten(2)


def patch_lesion_labels(
    prior_down: torch.Tensor,
    patch_size: Sequence[int],
    brain_down: torch.Tensor | None = None,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Decide which mini-patches are lesion patches (the positives ``Omega+`` of eq. 6).

    The rule: a mini-patch is a lesion patch when the mean of the bottleneck-resolution
    foreground prior over the mini-patch is at least ``threshold`` (default 0.5, i.e. the
    majority of the patch is lesion according to the prior). Section 3.3.2 defines ``Omega+``
    as the mini-patches whose content lies in the lesion region; this is our operational
    reading of that definition.

    With ``brain_down`` the mean is taken over the brain voxels of the patch only (so that a
    patch on the brain border is judged on its tissue), and a patch containing no brain voxel is
    never a lesion patch.

    Parameters
    ----------
    prior_down : torch.Tensor
        Foreground prior at bottleneck resolution, shape ``(B, 1, x, y, z)``, values in [0, 1]
        (see :func:`cgc_refine.model.losses.downsample_to`).
    patch_size : sequence of 3 int
        Requested mini-patch size; clipped and tiled as in :func:`patch_means`.
    brain_down : torch.Tensor, optional
        Brain mask at bottleneck resolution, shape ``(B, 1, x, y, z)``, boolean (or 0/1).
    threshold : float, optional
        A patch is lesion when its mean prior is ``>= threshold``. Default 0.5.

    Returns
    -------
    torch.Tensor
        Boolean tensor of shape ``(B, n_patches)``, in the patch order of :class:`FinePath`.

    Examples
    --------
    >>> prior = torch.zeros(1, 1, 4, 4, 2)
    >>> prior[..., :2, :2, :] = 1.0
    >>> patch_lesion_labels(prior, (2, 2, 2)).tolist()
    [[True, False, False, False]]
    """
    if prior_down.ndim != 5 or prior_down.shape[1] != 1:
        raise InvalidParameterError(
            f"prior_down must have shape (B, 1, x, y, z), got {tuple(prior_down.shape)}."
        )
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not 0 < threshold <= 1:
        raise InvalidParameterError(f"threshold must be a number in (0, 1], got {threshold!r}.")
    if brain_down is None:
        return patch_means(prior_down, patch_size)[:, 0] >= threshold
    if brain_down.shape != prior_down.shape:
        raise InvalidParameterError(
            f"brain_down must have the shape of prior_down {tuple(prior_down.shape)}, "
            f"got {tuple(brain_down.shape)}."
        )
    brain = (brain_down != 0).float()
    brain_frac = patch_means(brain, patch_size)[:, 0]
    prior_in_brain = patch_means(prior_down.float() * brain, patch_size)[:, 0]
    # mean over brain voxels = mean(prior * brain) / mean(brain); compare without dividing.
    return (brain_frac > 0) & (prior_in_brain >= threshold * brain_frac)


class CoarsePath(nn.Module):
    """Coarse-grained discrimination path (section 3.3.1).

    ``logits = conv1x1(ResidualBlock3D(z))`` is the coarse lesion map at bottleneck resolution,
    trained with ``L^cg_bce`` against the prior average-pooled to that resolution. With
    ``p = sigmoid(logits)`` the features are split into lesion regions ``p (x) z`` and normal
    regions ``(1 - p) (x) z``, which are fused back into the decoder input as

    ``z' = z + conv1x1(cat(p (x) z, (1 - p) (x) z))``.

    The fusion is our reading of Fig. 1 (the text does not spell it out); the residual form
    keeps ``z`` reachable by the decoder.

    Parameters
    ----------
    ch : int
        Number of channels of ``z``.
    norm : {"instance", "group", "batch"}, optional
        Normalisation of the residual block. Default ``"instance"``.
    act : {"leakyrelu", "relu"}, optional
        Activation of the residual block. Default ``"leakyrelu"``.
    """

    def __init__(self, ch: int, norm: str = "instance", act: str = "leakyrelu") -> None:
        super().__init__()
        ch = _check_positive_int(ch, "ch")
        self.ch = ch
        self.block = ResidualBlock3D(ch, ch, norm=norm, act=act)
        self.head = nn.Conv3d(ch, 1, kernel_size=1)
        self.fuse = nn.Conv3d(2 * ch, ch, kernel_size=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the coarse lesion map and fuse the lesion/normal regions into ``z``.

        Parameters
        ----------
        z : torch.Tensor
            Bottleneck features ``(B, ch, x, y, z)``.

        Returns
        -------
        fused : torch.Tensor
            ``z + conv1x1(cat(p z, (1 - p) z))``, same shape as ``z``.
        logits : torch.Tensor
            Coarse lesion logits ``(B, 1, x, y, z)``.
        """
        logits = self.head(self.block(z))
        p = torch.sigmoid(logits)
        lesion = p * z
        normal = (1.0 - p) * z
        fused = z + self.fuse(torch.cat([lesion, normal], dim=1))
        return fused, logits


class FinePath(nn.Module):
    """Fine-grained discrimination path (section 3.3.2): one embedding per mini-patch.

    ``z`` is cut into non-overlapping mini-patches of ``patch_size`` bottleneck voxels (default
    6x6x4 of the 24x24x8 bottleneck, i.e. 4x4x2 = 32 patches per crop; (12, 12, 4) and
    (3, 3, 2) are the other sizes of Table 2). Each voxel is projected by a small head
    (1x1x1 conv -> ReLU -> 1x1x1 conv to ``proj_dim``), the projections are averaged over the
    mini-patch and L2-normalised.

    If the bottleneck is smaller than ``patch_size`` along an axis (small crops) the patch is
    clipped to the bottleneck along that axis; if the bottleneck is not a multiple of the patch
    size the remainder is dropped (see :func:`clip_patch_size`).

    The patch size is counted in bottleneck voxels, whose physical size depends on the
    backbone's strides: with anisotropic strides (thick slices) a bottleneck voxel covers
    ``downsample_factors`` input voxels per axis, e.g. 8x8x1; to ask for a physical size use
    :func:`~cgc_refine.model.geometry.voxels_from_mm` with
    :func:`~cgc_refine.model.geometry.bottleneck_spacing`.

    Parameters
    ----------
    ch : int
        Number of channels of ``z``.
    patch_size : sequence of 3 int, optional
        Mini-patch size in bottleneck voxels. Default ``(6, 6, 4)``.
    proj_dim : int, optional
        Dimension of the embeddings. Default 128.
    hidden_dim : int, optional
        Width of the hidden layer of the projection head. Default ``ch``.
    """

    def __init__(
        self,
        ch: int,
        patch_size: Sequence[int] = (6, 6, 4),
        proj_dim: int = 128,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        ch = _check_positive_int(ch, "ch")
        self.patch_size = _check_patch_size(patch_size)
        self.proj_dim = _check_positive_int(proj_dim, "proj_dim")
        hidden = ch if hidden_dim is None else _check_positive_int(hidden_dim, "hidden_dim")
        self.ch = ch
        self.proj = nn.Sequential(
            nn.Conv3d(ch, hidden, kernel_size=1),
            nn.ReLU(),
            nn.Conv3d(hidden, self.proj_dim, kernel_size=1),
        )

    def effective_patch_size(self, spatial_size: Sequence[int]) -> tuple[int, int, int]:
        """Patch size used on a bottleneck of spatial size ``spatial_size`` (clipped)."""
        return clip_patch_size(self.patch_size, spatial_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Embed every mini-patch of the bottleneck features ``z`` ``(B, ch, x, y, z)``.

        Returns unit-norm embeddings ``(B, n_patches, proj_dim)``, the patches in the C order
        of the patch grid (the order of :func:`patch_lesion_labels`).
        """
        ps = self.effective_patch_size(z.shape[2:])
        h = self.proj(z)
        h = F.avg_pool3d(h, kernel_size=ps, stride=ps)  # (B, D, nx, ny, nz), remainder dropped
        emb = h.flatten(2).transpose(1, 2)  # (B, n_patches, D)
        return F.normalize(emb, dim=-1)


class CGCFeatures(NamedTuple):
    """Output of :class:`CGCModule`.

    Attributes
    ----------
    features : torch.Tensor
        Features for the decoder: ``z`` fused with the coarse regions, or ``z`` itself when the
        coarse path is off.
    coarse_logits : torch.Tensor or None
        Coarse lesion logits ``(B, 1, x, y, z)``; None when the coarse path is off.
    patch_embeddings : torch.Tensor or None
        Mini-patch embeddings ``(B, n_patches, proj_dim)``; None when the fine path is off.
    patch_size : tuple of int or None
        Effective (clipped) mini-patch size used; None when the fine path is off.
    """

    features: torch.Tensor
    coarse_logits: torch.Tensor | None
    patch_embeddings: torch.Tensor | None
    patch_size: tuple[int, int, int] | None


class CGCModule(nn.Module):
    """Cross-granularity contrastive module (section 3.3, Fig. 1), each path switchable.

    Parameters
    ----------
    ch : int
        Number of channels of the bottleneck features ``z``.
    use_coarse : bool, optional, keyword-only
        Enable the coarse-grained path (:class:`CoarsePath`). Default True.
    norm : {"instance", "group", "batch"}, optional, keyword-only
        Normalisation of the coarse path's residual block. Default ``"instance"``.
    act : {"leakyrelu", "relu"}, optional, keyword-only
        Activation of the coarse path's residual block. Default ``"leakyrelu"``.
    use_fine : bool, optional, keyword-only
        Enable the fine-grained path (:class:`FinePath`). Default True.
    patch_size : sequence of 3 int, optional, keyword-only
        Mini-patch size of the fine path. Default ``(6, 6, 4)``.
    proj_dim : int, optional, keyword-only
        Embedding dimension of the fine path. Default 128.

    Notes
    -----
    With both paths off the module holds no parameter and returns ``z`` unchanged, which gives
    the "Backbone + P" ablation of Table 2. Sub-modules are created only for enabled paths.
    """

    def __init__(
        self,
        ch: int,
        *,
        use_coarse: bool = True,
        norm: str = "instance",
        act: str = "leakyrelu",
        use_fine: bool = True,
        patch_size: Sequence[int] = (6, 6, 4),
        proj_dim: int = 128,
    ) -> None:
        super().__init__()
        ch = _check_positive_int(ch, "ch")
        for name, flag in (("use_coarse", use_coarse), ("use_fine", use_fine)):
            if not isinstance(flag, bool):
                raise InvalidParameterError(f"{name} must be a bool, got {flag!r}.")
        patch = _check_patch_size(patch_size)
        proj_dim = _check_positive_int(proj_dim, "proj_dim")
        norm, act = _check_norm_act(norm, act)
        self.ch = ch
        self.use_coarse = use_coarse
        self.use_fine = use_fine
        self.patch_size = patch
        self.proj_dim = proj_dim
        self.coarse = CoarsePath(ch, norm=norm, act=act) if use_coarse else None
        self.fine = FinePath(ch, patch_size=patch, proj_dim=proj_dim) if use_fine else None

    def fuse(self, z: torch.Tensor) -> torch.Tensor:
        """Features handed to the decoder (inference path: the fine path is skipped).

        Returns the coarse-path fusion of the bottleneck features ``z`` ``(B, ch, x, y, z)``,
        or ``z`` itself when the coarse path is off.
        """
        if self.coarse is None:
            return z
        return self.coarse(z)[0]

    def forward(self, z: torch.Tensor) -> CGCFeatures:
        """Run the enabled paths on the bottleneck features ``z`` ``(B, ch, x, y, z)``.

        Returns the :class:`CGCFeatures`: the decoder features and the auxiliary outputs
        (None for disabled paths).
        """
        features, coarse_logits = z, None
        if self.coarse is not None:
            features, coarse_logits = self.coarse(z)
        embeddings, patch = None, None
        if self.fine is not None:
            embeddings = self.fine(z)
            patch = self.fine.effective_patch_size(z.shape[2:])
        return CGCFeatures(features, coarse_logits, embeddings, patch)
