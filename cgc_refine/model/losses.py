"""Training losses of the paper (eqs. 1, 6, 7 and 8).

* :func:`masked_bce_with_logits` -- binary cross-entropy against the soft foreground prior
  (``L_bce``, eq. 1; the same form gives the coarse ``L^cg_bce`` of section 3.3.1), averaged
  over the voxels of a mask.
* :func:`downsample_to` / :func:`downsample_mask` -- the prior (and brain mask) average-pooled
  to bottleneck resolution, the target of ``L^cg_bce`` and the basis of the patch labels.
* :class:`PatchSupConLoss` -- the supervised contrastive loss over mini-patch embeddings
  (``L^fg_cl``, eq. 6) with cosine similarity (eq. 7).
* :class:`CGCLoss` -- the overall objective ``L_bce + lambda_cg L^cg_bce + lambda_fg L^fg_cl``
  (eq. 8).

All losses are computed in float32 whatever the input dtype (safe under bf16/fp16 autocast).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..device import fp32_region
from ..exceptions import InvalidParameterError, SpaceMismatchError
from .blocks import _check_positive_int
from .cgc import patch_lesion_labels, patch_means

if TYPE_CHECKING:
    from .network import CGCOutput

__all__ = [
    "masked_bce_with_logits",
    "downsample_to",
    "downsample_mask",
    "PatchSupConLoss",
    "CGCLoss",
]

_ANCHOR_MODES: tuple[str, ...] = ("lesion", "all")


def _check_real(value: object, name: str, *, low: float, low_open: bool) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = v == v and v != float("inf") and (v > low if low_open else v >= low)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        raise InvalidParameterError(f"{name} must be a finite number {bound}, got {value!r}.")
    return float(value)


def _check_shape(
    tensor: torch.Tensor | None,
    expected: Sequence[int],
    name: str,
    relation: str,
    *,
    error: type[Exception] = InvalidParameterError,
    hint: str = "",
) -> None:
    """Raise ``error`` when ``tensor`` is given and its shape is not ``expected``."""
    if tensor is not None and tuple(tensor.shape) != tuple(expected):
        raise error(f"{name} shape {tuple(tensor.shape)} {relation} {tuple(expected)}{hint}.")


def masked_bce_with_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy with soft targets, averaged over the voxels of a mask (eq. 1).

    ``L = 1/|M| sum_{j in M} -[y_j log sigma(s_j) + (1 - y_j) log(1 - sigma(s_j))]`` with
    ``s`` the logits, ``y`` the foreground probabilities of the prior and ``M`` the mask. Eq. 1
    of the paper writes the foreground-class term of the cross-entropy; with a single logit per
    voxel the two-class form above is the standard reading.

    Parameters
    ----------
    logits : torch.Tensor
        Predicted logits, any shape.
    target : torch.Tensor
        Soft targets in [0, 1] (the prior), same shape as ``logits``. Not checked for range
        (that would need a device synchronisation); detach it if it must not receive gradients.
    mask : torch.Tensor, optional
        Voxels to average over, same shape as ``logits``; boolean, or numeric with non-zero
        meaning "inside". None averages over all voxels.
    weight : torch.Tensor, optional
        Non-negative per-voxel weights ``w_j`` (same shape): the loss becomes the weighted mean
        ``sum_j w_j l_j / sum_j w_j`` over the mask -- how a noisy pseudo-label's confident
        voxels count more than its uncertain ones (see :func:`cgc_refine.training.target_weights`).

    Returns
    -------
    torch.Tensor
        Float32 scalar. With an empty mask the result is 0, still attached to the graph of
        ``logits`` (its gradient is zero), so ``backward`` works and no NaN appears.

    Raises
    ------
    InvalidParameterError
        If the shapes of ``logits``, ``target`` and ``mask`` differ.
    """
    if target.shape != logits.shape:
        raise InvalidParameterError(
            f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}."
        )
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), target.float(), reduction="none"
    )
    if mask is None and weight is None:
        return loss.mean()
    if mask is not None and mask.shape != logits.shape:
        raise InvalidParameterError(
            f"mask shape {tuple(mask.shape)} differs from logits shape {tuple(logits.shape)}."
        )
    if weight is not None and weight.shape != logits.shape:
        raise InvalidParameterError(
            f"weight shape {tuple(weight.shape)} differs from logits shape {tuple(logits.shape)}."
        )
    weights = torch.ones_like(loss) if mask is None else (mask != 0).float()
    if weight is not None:
        weights = weights * weight.float()
    return (loss * weights).sum() / weights.sum().clamp_min(1.0)


def downsample_to(prior: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Average-pool a full-resolution map to a smaller grid (e.g. the bottleneck).

    This is the "down-sampled foreground probability map" of section 3.3.1: the target of the
    coarse loss ``L^cg_bce`` and, through :func:`~cgc_refine.model.cgc.patch_lesion_labels`, the
    source of the mini-patch labels. Each output voxel is the mean of the block of input voxels
    it covers (``avg_pool3d`` with kernel = stride = the per-axis down-sampling factor). The
    factors are derived per axis from the two sizes, so the pooling follows the network's
    geometry: ``(8, 8, 8)`` for the paper's 3 isotropic down-samplings, ``(8, 8, 1)`` for a
    thick-slice network whose slice axis is never pooled
    (:func:`~cgc_refine.model.geometry.anisotropic_strides`).

    Parameters
    ----------
    prior : torch.Tensor
        Map of shape ``(B, C, X, Y, Z)``.
    size : sequence of 3 int
        Target spatial size ``(x, y, z)``; each ``X/x``, ``Y/y``, ``Z/z`` must be an integer.

    Returns
    -------
    torch.Tensor
        Float32 tensor of shape ``(B, C, x, y, z)``.

    Raises
    ------
    InvalidParameterError
        If ``prior`` is not 5-D or ``size`` does not divide its spatial size.
    """
    if prior.ndim != 5:
        raise InvalidParameterError(f"expected a (B, C, X, Y, Z) tensor, got shape {tuple(prior.shape)}.")
    if isinstance(size, (str, bytes)) or len(size) != 3:
        raise InvalidParameterError(f"size must be 3 positive integers, got {size!r}.")
    target = tuple(_check_positive_int(int(s), f"size[{i}]") for i, s in enumerate(size))
    spatial = tuple(int(s) for s in prior.shape[2:])
    if any(s % t for s, t in zip(spatial, target)):
        raise InvalidParameterError(
            f"cannot average-pool spatial size {spatial} to {target}: every input dimension must "
            f"be a multiple of the target dimension."
        )
    factors = tuple(s // t for s, t in zip(spatial, target))
    out = prior.float()
    if factors == (1, 1, 1):
        return out
    return F.avg_pool3d(out, kernel_size=factors, stride=factors)


def downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Down-sample a binary mask like the prior: a coarse voxel is inside when more than half
    of the fine voxels it covers are.

    Parameters
    ----------
    mask : torch.Tensor
        Boolean (or 0/1) mask ``(B, C, X, Y, Z)``.
    size : sequence of 3 int
        Target spatial size, see :func:`downsample_to`.

    Returns
    -------
    torch.Tensor
        Boolean tensor ``(B, C, x, y, z)``: ``downsample_to(mask, size) > 0.5``.
    """
    return downsample_to((mask != 0).float(), size) > 0.5


class PatchSupConLoss(nn.Module):
    """Supervised contrastive loss over mini-patch embeddings (``L^fg_cl``, eq. 6).

    For an anchor ``i`` with positives ``P(i)`` and contrast set ``A(i) = Omega \\ {i}``
    (``Omega'`` of eq. 6)::

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / tau) / sum_{a in A(i)} exp(s_ia / tau) )

    and the loss is the mean of ``l_i`` over the anchors that have at least one positive. The
    similarity is the cosine similarity ``s_ij = x_i x_j^T / (||x_i|| ||x_j||)``; eq. 7 prints the
    denominator as ``||x|| + ||y||``, a typo for the product (the text calls it the cosine), so
    the loss is invariant to the scale of each embedding.

    Anchors and positives:

    * ``anchors="lesion"`` (the literal reading of eq. 6, default): anchors are the lesion
      patches ``Omega+``, their positives the other lesion patches, and the denominator runs
      over every other patch (lesion and normal).
    * ``anchors="all"``: standard SupCon, normal patches are anchors too, with the other normal
      patches as positives.

    Eq. 6 sums over anchors; we average (as SupCon does), so the loss scale does not depend on
    the number of lesion patches in the batch. All patches of the batch are contrasted together
    (``(B, P, D)`` is flattened to ``(B*P, D)``). Anchors with no positive are skipped; if no
    anchor has a positive the loss is 0, still attached to the graph of the embeddings.

    The computation is done in float32 with a masked, max-shifted log-sum-exp, so it gives
    finite values and gradients for low temperatures (e.g. 0.07) and low-precision inputs.

    Parameters
    ----------
    temperature : float, optional
        Temperature ``tau`` > 0. Default 0.2, the best value of section 5.2.2 (a high
        temperature smooths the softmax against the label noise of the prior).
    anchors : {"lesion", "all"}, optional
        Which patches act as anchors, see above. Default ``"lesion"``.

    Raises
    ------
    InvalidParameterError
        If ``temperature`` is not a finite positive number or ``anchors`` is unknown.
    """

    def __init__(self, temperature: float = 0.2, anchors: str = "lesion") -> None:
        super().__init__()
        self.temperature = _check_real(temperature, "temperature", low=0.0, low_open=True)
        if not isinstance(anchors, str) or anchors not in _ANCHOR_MODES:
            raise InvalidParameterError(f"anchors must be 'lesion' or 'all', got {anchors!r}.")
        self.anchors = anchors

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, anchors={self.anchors!r}"

    def forward(
        self,
        embeddings: torch.Tensor,
        is_lesion: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Parameters
        ----------
        embeddings : torch.Tensor
            Patch embeddings ``(N, D)`` or ``(B, P, D)``; need not be normalised.
        is_lesion : torch.Tensor
            Boolean (or 0/1) lesion label of each patch, ``(N,)`` or ``(B, P)``.
        mask : torch.Tensor, optional
            Boolean, same shape as ``is_lesion``: patches that take part in the loss at all
            (neither anchor, positive nor in any denominator when False). Default: all.

        Returns
        -------
        torch.Tensor
            Float32 scalar.

        Raises
        ------
        InvalidParameterError
            If the shapes do not match.
        """
        if embeddings.ndim not in (2, 3):
            raise InvalidParameterError(
                f"embeddings must have shape (N, D) or (B, P, D), got {tuple(embeddings.shape)}."
            )
        _check_shape(is_lesion, embeddings.shape[:-1], "is_lesion",
                     "does not match the embeddings' leading shape")
        _check_shape(mask, is_lesion.shape, "mask", "does not match is_lesion")
        labels = is_lesion.reshape(-1) != 0
        valid = None if mask is None else mask.reshape(-1) != 0
        with fp32_region(embeddings.device):
            emb = embeddings.reshape(-1, embeddings.shape[-1]).float()
            return _supcon(emb, labels, valid, self.temperature, self.anchors == "lesion")


def _supcon(
    emb: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None,
    temperature: float,
    lesion_anchors_only: bool,
) -> torch.Tensor:
    """Eq. 6 on flattened float32 embeddings ``(N, D)``; see :class:`PatchSupConLoss`."""
    emb = F.normalize(emb, dim=-1)  # cosine similarity (eq. 7, with the typo fixed)
    n = emb.shape[0]
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=emb.device)
    not_self = ~torch.eye(n, dtype=torch.bool, device=emb.device)
    contrast = not_self & valid[None, :] & valid[:, None]  # Omega' = Omega minus the anchor
    positives = contrast & (labels[:, None] == labels[None, :])
    anchor = valid & labels if lesion_anchors_only else valid

    sim = emb @ emb.T / temperature
    # Shift by the row maximum over the contrast set (rows with an empty set: shift 0).
    row_max = sim.masked_fill(~contrast, float("-inf")).amax(dim=1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = sim - row_max.detach()
    # exp(-inf) = 0 with a zero gradient: masked entries (self, excluded) leave the denominator.
    denom = torch.exp(shifted.masked_fill(~contrast, float("-inf"))).sum(dim=1, keepdim=True)
    log_prob = shifted - torch.log(denom.clamp_min(torch.finfo(denom.dtype).tiny))

    n_pos = positives.sum(dim=1)
    zeros = torch.zeros_like(log_prob)
    mean_log_prob_pos = torch.where(positives, log_prob, zeros).sum(dim=1) / n_pos.clamp_min(1)
    use = anchor & (n_pos > 0)  # anchors without a positive are skipped
    per_anchor = torch.where(use, -mean_log_prob_pos, torch.zeros_like(mean_log_prob_pos))
    # No usable anchor: 0, still attached to the graph of the embeddings.
    return per_anchor.sum() / use.sum().clamp_min(1).to(per_anchor.dtype)


class CGCLoss(nn.Module):
    """Overall objective of the paper (eq. 8).

    ``L = L_bce + lambda_cg L^cg_bce + lambda_fg L^fg_cl`` where

    * ``L_bce`` (eq. 1): :func:`masked_bce_with_logits` of the full-resolution logits against
      the prior, over the brain mask when given;
    * ``L^cg_bce`` (section 3.3.1): the same loss for the coarse logits against the prior
      average-pooled to bottleneck resolution (:func:`downsample_to`), over the brain mask
      down-sampled the same way (:func:`downsample_mask`);
    * ``L^fg_cl`` (eq. 6): :class:`PatchSupConLoss` of the patch embeddings, a patch being a
      lesion patch when the mean down-sampled prior over it is ``>= patch_threshold``
      (:func:`~cgc_refine.model.cgc.patch_lesion_labels`); with a brain mask, patches without
      any brain voxel are left out of the contrast.

    Eq. 8 of the paper writes the last term as ``L^fg_bce``, a typo for ``L^fg_cl`` of eq. 6.
    Terms whose path is absent from the output (None) are 0. The prior is a fixed target: it is
    detached (section 4.3, "the network weights training processes were detached from the
    calculation of P").

    Parameters
    ----------
    lambda_cg : float, optional
        Weight of the coarse loss, ``>= 0``. Default 1.0 (section 4.3).
    lambda_fg : float, optional
        Weight of the fine contrastive loss, ``>= 0``. Default 1.0 (section 4.3).
    temperature : float, optional
        Temperature of :class:`PatchSupConLoss`. Default 0.2 (section 5.2.2).
    patch_threshold : float, optional
        Mean-prior threshold of a lesion patch, in (0, 1]. Default 0.5.
    anchors : {"lesion", "all"}, optional
        Anchor mode of :class:`PatchSupConLoss`. Default ``"lesion"``.

    Raises
    ------
    InvalidParameterError
        If an argument is out of range.
    """

    def __init__(
        self,
        lambda_cg: float = 1.0,
        lambda_fg: float = 1.0,
        temperature: float = 0.2,
        patch_threshold: float = 0.5,
        anchors: str = "lesion",
    ) -> None:
        super().__init__()
        self.lambda_cg = _check_real(lambda_cg, "lambda_cg", low=0.0, low_open=False)
        self.lambda_fg = _check_real(lambda_fg, "lambda_fg", low=0.0, low_open=False)
        threshold = _check_real(patch_threshold, "patch_threshold", low=0.0, low_open=True)
        if threshold > 1.0:
            raise InvalidParameterError(f"patch_threshold must be in (0, 1], got {patch_threshold!r}.")
        self.patch_threshold = threshold
        self.supcon = PatchSupConLoss(temperature=temperature, anchors=anchors)

    def extra_repr(self) -> str:
        return (
            f"lambda_cg={self.lambda_cg}, lambda_fg={self.lambda_fg}, "
            f"patch_threshold={self.patch_threshold}"
        )

    def forward(
        self,
        output: CGCOutput,
        prior: torch.Tensor,
        brain_mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the overall loss.

        Parameters
        ----------
        output : CGCOutput
            Output of :meth:`cgc_refine.model.network.CGCUNet.forward_train`.
        prior : torch.Tensor
            Foreground probability ``(B, 1, X, Y, Z)`` in [0, 1], on the grid of the logits.
        brain_mask : torch.Tensor, optional
            Boolean (or 0/1) brain mask ``(B, 1, X, Y, Z)``; None uses every voxel.
        weight : torch.Tensor, optional
            Per-voxel weights of the full-resolution BCE term ``(B, 1, X, Y, Z)`` (the
            pseudo-label's confidence); the coarse and fine paths are unweighted.

        Returns
        -------
        total : torch.Tensor
            Float32 scalar to back-propagate.
        components : dict of str to torch.Tensor
            Detached scalars ``"bce"``, ``"coarse"``, ``"fine"`` (unweighted) and ``"total"``.

        Raises
        ------
        cgc_refine.exceptions.SpaceMismatchError
            If the prior or the mask is not on the grid of the logits.
        InvalidParameterError
            If the output lacks the bottleneck or patch size needed by an enabled term.
        """
        logits = output.logits
        _check_shape(prior, logits.shape, "prior", "differs from the logits shape",
                     error=SpaceMismatchError,
                     hint="; the prior must be on the grid of the network input")
        _check_shape(brain_mask, logits.shape, "brain_mask", "differs from the logits shape",
                     error=SpaceMismatchError)
        prior = prior.detach()
        bce = masked_bce_with_logits(logits, prior, brain_mask,
                                     None if weight is None else weight.detach())
        zero = torch.zeros((), dtype=torch.float32, device=logits.device)
        coarse, fine = zero, zero

        if output.coarse_logits is not None or output.patch_embeddings is not None:
            size = output.bottleneck_size
            if size is None and output.coarse_logits is not None:
                size = tuple(int(s) for s in output.coarse_logits.shape[2:])
            if size is None:
                raise InvalidParameterError(
                    "output.bottleneck_size is required to down-sample the prior for the fine "
                    "path; use CGCUNet.forward_train, which sets it."
                )
            prior_down = downsample_to(prior, size)
            brain_down = None if brain_mask is None else downsample_mask(brain_mask, size)
            if output.coarse_logits is not None:
                coarse = masked_bce_with_logits(output.coarse_logits, prior_down, brain_down)
            if output.patch_embeddings is not None:
                if output.patch_size is None:
                    raise InvalidParameterError(
                        "output.patch_size is required with patch_embeddings; use "
                        "CGCUNet.forward_train, which sets it."
                    )
                labels = patch_lesion_labels(
                    prior_down, output.patch_size, brain_down, threshold=self.patch_threshold
                )
                keep = None
                if brain_down is not None:
                    keep = patch_means(brain_down.float(), output.patch_size)[:, 0] > 0
                fine = self.supcon(output.patch_embeddings, labels, keep)

        total = bce + self.lambda_cg * coarse + self.lambda_fg * fine
        components = {
            "bce": bce.detach(),
            "coarse": coarse.detach(),
            "fine": fine.detach(),
            "total": total.detach(),
        }
        return total, components
