r"""Two-phase piecewise-constant Mumford-Shah (Chan-Vese) foreground prior.

This is the Mumford-Shah baseline of the paper's Table 1 (ref. [26], Kim & Ye, whose loss is
the piecewise-constant Mumford-Shah functional evaluated on soft class maps). Here the same
functional is minimised directly on the image, without a network, by convex optimisation in
torch (on the CPU, or on CUDA when the input or ``device`` says so).

Energy
------
Inside the brain mask :math:`\Omega` the image is modelled by two constant phases, the
foreground (lesion) with mean vector :math:`c_1` and the background with mean :math:`c_2`.
With the relaxed foreground indicator :math:`u \in [0, 1]^\Omega` (Chan, Esedoglu & Nikolova
2006) the minimised energy is

.. math::

    E(u, c_1, c_2) = \sum_{v \in \Omega} \big[u_v \lVert x_v - c_1 \rVert^2
        + (1 - u_v) \lVert x_v - c_2 \rVert^2\big] + \lambda\, \mathrm{TV}_h(u).

* :math:`x_v` holds the channels of voxel :math:`v` (the fidelity is summed over channels),
  each rescaled to unit robust scale inside the brain (IQR / 1.349; a no-op for MRI channels
  from :func:`~cgc_refine.priors.base.prepare_prior_input`, which are standardised that way
  already). :math:`\lambda` is therefore in units of the robust brain variance
  :math:`\sigma^2` times mm, whatever the intensity unit (z-scores, windowed CT).
* By default the bright channel is floored at its first quartile inside the brain
  (``dark_floor_quantile=0.25``) before anything else. Lesions are brighter than normal
  tissue, so the darkest quarter of the brain (CSF, sulci, the dark end of normal tissue)
  is background whatever its exact value; without the floor a large dark population can
  make the best two-phase split "CSF versus the rest" (it did on one of the six BraTS
  FLAIR cases we checked). The first quartile rather than the median keeps a bright phase
  of up to 75 % of the brain segmentable.
* :math:`\mathrm{TV}_h(u) = \sum_v \lVert \nabla_h u_v \rVert_2` is the isotropic total
  variation with spacing-aware forward differences :math:`(u_{v + e_d} - u_v) / h_d` (mm),
  taken only on edges whose two voxels lie in the brain (Neumann boundary on the mask).
  Both terms are per-voxel sums (the voxel volume cancels), so in the binary case a ball of
  radius :math:`R` whose voxels gain :math:`g` in fidelity by joining the foreground is kept
  iff :math:`R > 3 \lambda / g`, and a sheet of thickness :math:`t` iff :math:`t > 2\lambda/g`.

For fixed means the relaxed problem is convex and thresholding a minimiser at any level in
(0, 1) gives a global minimiser of the binary Chan-Vese problem.

Algorithm
---------
1. *Label-free initialisation* from two seeds of the bright channel: the voxels above its
   ``init_percentile`` (97th) percentile (a small, surely bright seed) and the voxels above
   Otsu's threshold (the exact TV-free two-phase split of its histogram, which does not
   assume a small bright phase). Each seed gives starting means; both starts are fitted
   (step 2) and the one that ends at the lower energy is kept. The alternation is not
   convex in the means, and either seed alone can stall: the percentile seed when the bright
   phase is large, Otsu's when a dark population dominates the histogram.
2. *Alternating minimisation*: Chambolle-Pock primal-dual steps on
   :math:`\min_{u \in [0,1]} \max_{\lVert p_v \rVert \le \lambda} \langle r, u\rangle +
   \langle p, \nabla_h u\rangle` with :math:`r = \lVert x - c_1\rVert^2 - \lVert x - c_2
   \rVert^2` and diagonal preconditioning (:math:`\tau = 1 / (2 \sum_d h_d^{-1})`,
   :math:`\sigma_d = h_d / 2`, Pock & Chambolle 2011). Every ``update_every`` steps the
   means are set to their closed-form minimisers on the partition :math:`u \ge 1/2` (for
   fixed means that threshold of the relaxed minimiser is a binary minimiser, so this is
   block-coordinate descent on the binary energy; means weighted by a fractional
   :math:`u` would drift towards each other) and the binary energy is recorded. The loop
   stops when the relative energy change is below ``tol`` *and* the primal-dual gap of the
   relaxed problem is below ``100 tol`` per voxel, or after ``n_iter`` steps. The
   selection of step 1 runs on a 2x2x2-averaged copy of the volume (8 times fewer voxels);
   the full-resolution fit is then warm-started from it (``multiscale``).
3. *Foreground phase*: the phase with the higher mean in the bright channel (lesions are
   hyperintense on FLAIR and hyperdense on brain-windowed CT), whatever its size.
4. *Soft map*: at the converged means the entropy-smoothed problem

   .. math::

       u_\varepsilon = \arg\min_{u} E(u, c_1, c_2) + \varepsilon \sum_{v \in \Omega}
           \big[u_v \log u_v + (1 - u_v) \log(1 - u_v)\big]

   is solved by FISTA on its smooth dual, warm-started from step 2. Its solution is
   :math:`u_\varepsilon = \operatorname{sigmoid}(-s / \varepsilon)` with
   :math:`s = r - \operatorname{div}_h p` the *TV-regularised* fidelity difference. The
   Chan-Vese fidelity is :math:`-2\sigma_w^2` times the log-likelihood of an equal-variance
   Gaussian two-phase model, so with the default :math:`\varepsilon = 2 \hat\sigma_w^2`
   (:math:`\hat\sigma_w^2` the fitted within-phase variance per channel) the pointwise part
   is exactly that model's posterior with equal priors, and the TV term adds the boundary
   length prior in a convex variational approximation.

Reading the output: the returned map is :math:`u_\varepsilon`, a foreground probability per
brain voxel (0 outside the brain); ``u >= 0.5`` is the hard segmentation (it coincides with
the relaxed Chan-Vese segmentation of step 2 up to boundary voxels; their Dice agreement is
reported as ``hard_agreement``). Values near 0.5 mark boundary voxels and weakly contrasted
structures; isolated bright noise voxels are pulled to near 0 by the length term.

Performance: the volume is cropped to the brain's bounding box, every step is a handful of
vectorised in-place torch operations, and the start selection runs at half resolution; a
BraTS volume (240 x 240 x 155) takes seconds on a CPU. On a CPU shared with other busy
processes torch's intra-op threads can leave each small operation waiting for a descheduled
thread; ``torch.set_num_threads(1)`` is then faster.

Why the entropy only enters at the end: minimising the entropy-smoothed energy jointly over
the means is degenerate for a small bright phase -- :math:`c_1 = c_2` with :math:`u = 1/2`
everywhere gains :math:`\varepsilon \log 2` per voxel, more than separating a lesion of a
few percent of the brain does -- so the means are fitted on the unsmoothed Chan-Vese energy.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..exceptions import (
    EmptyMaskError,
    InvalidImageError,
    InvalidPriorError,
    SpaceMismatchError,
)
from .base import ProbabilityMap, prepare_prior_input

__all__ = [
    "DEFAULT_LENGTH_WEIGHT",
    "DEFAULT_N_ITER",
    "DEFAULT_N_ITER_SOFT",
    "DEFAULT_INIT_PERCENTILE",
    "DEFAULT_DARK_FLOOR_QUANTILE",
    "mumford_shah_probability",
    "MumfordShahPrior",
]

logger = logging.getLogger(__name__)

#: Default TV weight lambda, in robust brain variance (sigma^2) x mm. FLAIR lesions sit about
#: 3 robust SDs above the brain median, so a fully contrasted lesion voxel gains
#: g = (c1 - c2)^2 ~ 9 sigma^2 by joining the foreground. With lambda = 3 a lesion ball is
#: kept from a radius of 3 lambda / g = 1 mm on (2 mm diameter), while bright sheets thinner
#: than 2 lambda / g ~ 0.7 mm (1.3 mm at half contrast) and voxel-sized bright noise are
#: removed.
DEFAULT_LENGTH_WEIGHT = 3.0
#: Default maximum number of primal-dual steps of the Chan-Vese fit.
DEFAULT_N_ITER = 150
#: Default maximum number of FISTA steps of the soft (entropy-smoothed) map.
DEFAULT_N_ITER_SOFT = 40
#: Default percentile of the bright channel (inside the brain) that seeds the foreground.
DEFAULT_INIT_PERCENTILE = 97.0
#: Default quantile of the bright channel at which it is floored (see ``dark_floor_quantile``).
DEFAULT_DARK_FLOOR_QUANTILE = 0.25

_DeviceLike = str | torch.device | None


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _check_number(name: str, value: Any, *, allow_zero: bool = False, hint: str = "") -> float:
    ok = _is_real(value) and (float(value) >= 0.0 if allow_zero else float(value) > 0.0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidPriorError(f"{name} must be a finite number {bound}, got {value!r}{hint}")
    return float(value)


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise InvalidPriorError(f"{name} must be an integer >= {minimum}, got {value!r}{hint}")
    return int(value)


def _check_percentile(value: Any) -> float:
    if not _is_real(value) or not 0.0 < float(value) < 100.0:
        raise InvalidPriorError(
            f"init_percentile must be a number in (0, 100), got {value!r}; "
            "the default 97 seeds the foreground with the brightest 3% of the brain"
        )
    return float(value)


def _check_length_weight(value: Any) -> float:
    return _check_number(
        "length_weight", value, allow_zero=True,
        hint=f"; it is the TV weight in sigma^2 x mm (default {DEFAULT_LENGTH_WEIGHT})",
    )


def _check_epsilon(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value == "auto"):
        return None
    return _check_number(
        "epsilon", value,
        hint="; it is the soft map's temperature (None: twice the within-phase variance)",
    )


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise InvalidPriorError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_floor_quantile(value: Any) -> float | None:
    if value is None:
        return None
    if not _is_real(value) or not 0.0 <= float(value) < 1.0:
        raise InvalidPriorError(
            f"dark_floor_quantile must be None or a number in [0, 1), got {value!r}; "
            f"the default {DEFAULT_DARK_FLOOR_QUANTILE} floors the darkest quarter of the brain"
        )
    return float(value) if float(value) > 0.0 else None


def _check_spacing(spacing: Any) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise InvalidImageError(
            f"spacing must be three positive voxel sizes in mm, got {spacing!r}"
        )
    return values  # type: ignore[return-value]


def _resolve_device(device: _DeviceLike, default: torch.device) -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda[:N]"``, a :class:`torch.device` or None into a device.

    Names are checked here (a bad one is a parameter error of this prior); availability is
    checked by :func:`cgc_refine.device.resolve_device`.
    """
    if device is None:
        return default
    if not isinstance(device, str | torch.device):
        raise InvalidPriorError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}"
        )
    if device != "auto":
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError) as exc:
            raise InvalidPriorError(
                f"device={device!r} is not a device torch understands; use 'auto', 'cpu' or 'cuda'"
            ) from exc
        if kind not in ("cpu", "cuda"):
            raise InvalidPriorError(f"device={device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    return resolve_device(device)


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    array = np.asarray(value)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ) or np.iscomplexobj(array):
        raise InvalidImageError(f"{name} must be a real numeric array, got dtype {array.dtype}")
    if array.dtype in (np.float16, np.longdouble) or np.issubdtype(array.dtype, np.unsignedinteger):
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (q in [0, 1]) of a 1-D tensor, nearest rank (no size limit)."""
    n = int(values.numel())
    k = min(max(int(math.ceil(q * n)), 1), n)
    return torch.kthvalue(values, k).values


# --------------------------------------------------------------------------------------------
# finite differences on the brain domain
# --------------------------------------------------------------------------------------------


class _Grid:
    """Spacing-aware forward differences restricted to edges inside a mask.

    ``grad_d u = w_d * (u[v + e_d] - u[v])`` with ``w_d = 1 / h_d`` on edges whose two voxels
    are in the mask and 0 elsewhere; ``div = -grad^T``. Dual fields handled here are zero on
    the edges outside the mask (the gradient steps never reach them), which lets the
    divergence use the scalar ``1 / h_d`` instead of ``w_d``.
    """

    def __init__(self, mask: torch.Tensor, spacing: Sequence[float]) -> None:
        self.shape = tuple(mask.shape)
        self.inv_h = [1.0 / float(h) for h in spacing]
        self.weights: list[torch.Tensor] = []
        for axis, inv in enumerate(self.inv_h):
            w = torch.zeros(self.shape, dtype=torch.float32, device=mask.device)
            n = self.shape[axis]
            if n > 1:
                both = mask.narrow(axis, 0, n - 1) & mask.narrow(axis, 1, n - 1)
                w.narrow(axis, 0, n - 1).copy_(both.to(torch.float32) * inv)
            self.weights.append(w)
        self.buffer = torch.zeros(self.shape, dtype=torch.float32, device=mask.device)

    def _diff(self, u: torch.Tensor, axis: int) -> torch.Tensor:
        """Forward difference along ``axis`` into the shared buffer (its last slice is stale)."""
        n = self.shape[axis]
        if n > 1:
            torch.sub(u.narrow(axis, 1, n - 1), u.narrow(axis, 0, n - 1),
                      out=self.buffer.narrow(axis, 0, n - 1))
        return self.buffer

    def ascend(self, p: list[torch.Tensor], u: torch.Tensor, steps: Sequence[float]) -> None:
        """``p_d += steps_d * grad_d u`` in place."""
        for axis, (pd, w) in enumerate(zip(p, self.weights)):
            pd.addcmul_(self._diff(u, axis), w, value=float(steps[axis]))

    def tv(self, u: torch.Tensor) -> float:
        """Isotropic total variation ``sum_v ||grad u_v||``."""
        total = torch.zeros(self.shape, dtype=torch.float32, device=u.device)
        for axis, w in enumerate(self.weights):
            g = self._diff(u, axis) * w
            total.addcmul_(g, g)
        return float(total.sqrt_().sum())

    def divergence(self, p: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """``out = div p = -grad^T p``."""
        torch.mul(p[0], self.inv_h[0], out=out)
        for axis, (pd, inv) in enumerate(zip(p, self.inv_h)):
            if axis:
                out.add_(pd, alpha=inv)
            n = self.shape[axis]
            if n > 1:
                out.narrow(axis, 1, n - 1).sub_(pd.narrow(axis, 0, n - 1), alpha=inv)
        return out


def _project(p: list[torch.Tensor], radius: float, work: torch.Tensor) -> None:
    """Project every voxel's vector ``p_v`` onto the ball of radius ``radius``, in place."""
    torch.mul(p[0], p[0], out=work)
    work.addcmul_(p[1], p[1]).addcmul_(p[2], p[2])
    work.clamp_(min=radius * radius).rsqrt_().mul_(radius)
    for pd in p:
        pd.mul_(work)


def _seed_above(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Voxels strictly above ``threshold``, or at it when none is above."""
    seed = values > threshold
    return seed if bool(seed.any()) else values >= threshold


def _otsu_threshold(values: torch.Tensor, bins: int = 1024) -> torch.Tensor:
    """Otsu's threshold: the exact two-means (TV-free Chan-Vese) split of a histogram."""
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return values.max()
    counts = torch.histc(values, bins=bins, min=low, max=high).double()
    centres = torch.linspace(low, high, bins + 1, dtype=torch.float64, device=values.device)
    centres = 0.5 * (centres[1:] + centres[:-1])
    w0 = counts.cumsum(0)
    m0 = (counts * centres).cumsum(0)
    total, mean_total = w0[-1], m0[-1]
    w1 = total - w0
    between = (m0 * total - w0 * mean_total) ** 2 / (w0 * w1).clamp(min=1e-12)
    between[w1 <= 0] = -1.0
    k = int(torch.argmax(between))
    threshold = low + (k + 1) * (high - low) / bins
    return torch.tensor(threshold, dtype=values.dtype, device=values.device)


def _fidelity_difference(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                         outside: torch.Tensor) -> torch.Tensor:
    """``r = ||x - c1||^2 - ||x - c2||^2`` per voxel; +1 outside the mask (pushes u to 0)."""
    diff = (c1 - c2).view(-1, 1, 1, 1)
    r = (x * diff).sum(dim=0).mul_(-2.0).add_(float((c1 * c1).sum() - (c2 * c2).sum()))
    return r.masked_fill_(outside, 1.0)


class _Level:
    """One resolution level of the Chan-Vese problem: data, mask, grid and the fit state."""

    def __init__(self, x: torch.Tensor, mask: torch.Tensor, spacing: Sequence[float]) -> None:
        self.x = x
        self.mask = mask
        self.outside = ~mask
        self.mask_f = mask.to(torch.float32)
        self.grid = _Grid(mask, spacing)
        inside = x[:, mask]
        self.n_vox = int(inside.shape[1])
        self.sum_x = inside.sum(dim=1)
        self.sum_x2 = float((inside.double() ** 2).sum())

    def coarsened(self) -> _Level | None:
        """The level at half resolution (2x2x2 mask-weighted averages), or None if too small."""
        shape = self.mask.shape
        if min(shape) < 8:
            return None
        pad = []
        for n in reversed(shape):
            pad += [0, n % 2]
        mask_f = F.pad(self.mask_f, pad)[None, None]
        x = F.pad(self.x * self.mask_f, pad)[None]
        den = F.avg_pool3d(mask_f, 2)[0, 0]
        num = F.avg_pool3d(x, 2)[0]
        mask = den >= 0.5
        if int(mask.sum()) < 64:
            return None
        xc = (num / den.clamp(min=1e-6)).masked_fill_(~mask, 0.0)
        return _Level(xc, mask, [2.0 / inv for inv in self.grid.inv_h])

    def fidelity(self, u: torch.Tensor, r: torch.Tensor, c2: torch.Tensor) -> float:
        """``sum u ||x - c1||^2 + (1 - u) ||x - c2||^2`` = ``sum ||x - c2||^2 + sum u r``."""
        base = (
            self.sum_x2
            - 2.0 * float((c2 * self.sum_x).sum())
            + self.n_vox * float((c2 * c2).sum())
        )
        return base + float((u * r * self.mask_f).sum())

    def means(
        self, u: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form phase means for the indicator ``u`` (the old ones for an empty phase)."""
        su = float(u.sum())
        ux = (self.x * u).flatten(1).sum(dim=1)
        new1 = ux / su if su > 1e-6 else c1
        new2 = (self.sum_x - ux) / (self.n_vox - su) if self.n_vox - su > 1e-6 else c2
        return new1, new2

    def fit(
        self,
        c1: torch.Tensor,
        c2: torch.Tensor,
        lam: float,
        u: torch.Tensor | None,
        p: list[torch.Tensor] | None,
        max_iter: int,
        every: int,
        tol: float,
    ) -> dict[str, Any]:
        """Alternate Chambolle-Pock steps on u with mean updates until the energy settles."""
        grid = self.grid
        tau = 1.0 / (2.0 * sum(grid.inv_h))
        sigmas = [0.5 / inv for inv in grid.inv_h]
        r = _fidelity_difference(self.x, c1, c2, self.outside)
        if u is None:
            u = (r < 0).to(torch.float32)
        u = u.mul(self.mask_f)
        if p is None or lam == 0:
            p = [torch.zeros_like(u) for _ in range(3)]
        u_bar = u.clone()
        u_new = torch.empty_like(u)
        force = torch.empty_like(u)
        work = torch.empty_like(u)
        history: list[float] = []
        converged = False
        done = 0
        while done < max_iter:
            for _ in range(min(every, max_iter - done)):
                if lam > 0:
                    grid.ascend(p, u_bar, sigmas)
                    _project(p, lam, work)
                    grid.divergence(p, out=force)
                    force.sub_(r)
                else:
                    torch.neg(r, out=force)
                torch.add(u, force, alpha=tau, out=u_new).clamp_(0.0, 1.0)
                torch.sub(u_new, u, out=u_bar).add_(u_new)  # over-relaxation: 2 u_new - u
                u, u_new = u_new, u
                done += 1
            u.mul_(self.mask_f)
            # primal-dual gap of the relaxed problem at the current means (force = div p - r)
            if lam > 0:
                primal = float((u * r).sum()) + lam * grid.tv(u)
                dual = -float((force.clamp_(min=0.0) * self.mask_f).sum())
            else:
                primal = float((u * r).sum())
                dual = float((r.clamp(max=0.0) * self.mask_f).sum())
            gap = (primal - dual) / self.n_vox
            # For fixed means, thresholding the relaxed minimiser gives the binary minimiser
            # (Chan, Esedoglu & Nikolova): update the means on that partition, where they are
            # exact, and track the binary energy. (Means weighted by a fractional u drift
            # towards each other.)
            hard = (u >= 0.5).to(torch.float32)
            c1, c2 = self.means(hard, c1, c2)
            r = _fidelity_difference(self.x, c1, c2, self.outside)
            history.append(self.fidelity(hard, r, c2) + (lam * grid.tv(hard) if lam > 0 else 0.0))
            logger.debug("Mumford-Shah: %s voxels, step %d, E=%.8g, gap/voxel=%.3g",
                         tuple(u.shape), done, history[-1], gap)
            settled = len(history) >= 2 and (
                abs(history[-2] - history[-1]) <= tol * max(abs(history[-1]), 1e-12)
            )
            if settled and gap <= 100.0 * tol:
                converged = True
                break
        return {"u": u, "p": p, "r": r, "c1": c1, "c2": c2, "history": history,
                "n_iter": done, "converged": converged}


def _upsample(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling, cropped to ``shape``."""
    for axis in range(3):
        t = t.repeat_interleave(2, dim=axis)
    return t[: shape[0], : shape[1], : shape[2]].contiguous()


# --------------------------------------------------------------------------------------------
# core solver
# --------------------------------------------------------------------------------------------


def mumford_shah_probability(
    channels: np.ndarray | torch.Tensor,
    brain_mask: np.ndarray | torch.Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    bright_channel: int = 0,
    length_weight: float = DEFAULT_LENGTH_WEIGHT,
    n_iter: int = DEFAULT_N_ITER,
    epsilon: float | None = None,
    n_iter_soft: int = DEFAULT_N_ITER_SOFT,
    tol: float = 1e-4,
    update_every: int = 10,
    init_percentile: float = DEFAULT_INIT_PERCENTILE,
    dark_floor_quantile: float | None = DEFAULT_DARK_FLOOR_QUANTILE,
    multiscale: bool = True,
    device: _DeviceLike = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    r"""Soft two-phase piecewise-constant Mumford-Shah (Chan-Vese) segmentation of the brain.

    Minimises the convex-relaxed Chan-Vese energy

    ``E(u, c1, c2) = sum_brain [u ||x - c1||^2 + (1 - u) ||x - c2||^2] + lambda TV_h(u)``,
    ``u`` in [0, 1],

    by alternating Chambolle-Pock steps on ``u`` with closed-form updates of the phase means,
    then returns the entropy-smoothed indicator ``u_eps = argmin_u E(u, c1, c2) + eps *
    sum [u log u + (1 - u) log(1 - u)]`` at the converged means (see the module docstring
    for the derivation and how to read it). The volume is cropped to the brain's bounding
    box; everything runs under :func:`torch.no_grad` on ``device``.

    Parameters
    ----------
    channels : numpy.ndarray or torch.Tensor
        Image channels (C, X, Y, Z) or one volume (X, Y, Z), typically
        ``prepare_prior_input(...).channels``. Each channel is rescaled internally to unit
        robust scale inside the brain (IQR / 1.349), so the parameters do not depend on the
        intensity unit.
    brain_mask : numpy.ndarray or torch.Tensor
        Boolean (X, Y, Z) mask; the energy is defined on its voxels only.
    spacing : sequence of 3 float, default (1, 1, 1)
        Voxel size in mm, used by the finite differences of the TV term.
    bright_channel : int, default 0
        Channel in which lesions are bright. It seeds the initialisation and decides which
        phase is the foreground (the one with the higher mean there).
    length_weight : float, default 3.0
        TV weight ``lambda`` in robust variance x mm; 0 switches the regulariser off (the
        fit is then 2-means clustering). See :data:`DEFAULT_LENGTH_WEIGHT`.
    n_iter : int, default 150
        Maximum number of primal-dual steps of the Chan-Vese fit, per start and resolution
        level. The step sizes are set by the spacing (diagonal preconditioning), so there is
        no step size to tune.
    epsilon : float or None, default None
        Temperature of the soft map, in robust variance units. None: twice the fitted
        within-phase variance per channel, which makes the pointwise part of the map the
        posterior of the Gaussian two-phase model. Smaller values give a sharper map.
    n_iter_soft : int, default 40
        Maximum number of FISTA steps for the soft map (fixed step ``eps / sum_d h_d**-2``,
        the inverse Lipschitz constant of the dual gradient).
    tol : float, default 1e-4
        The fit stops when the relative change of the energy between two mean updates is
        below ``tol`` and the primal-dual gap is below ``100 * tol`` per voxel (robust
        variance units); the soft map stops when no voxel changes by more than ``100 * tol``
        over 10 steps.
    update_every : int, default 10
        Primal-dual steps between two updates of the phase means.
    init_percentile : float, default 97
        Brain voxels above this percentile of the bright channel form one of the two
        foreground seeds (the other is Otsu's threshold).
    dark_floor_quantile : float or None, default 0.25
        Floor the bright channel at this quantile of its brain values before fitting (None
        or 0: no floor). Lesions are brighter than normal tissue, so the darkest voxels (CSF,
        sulci) are background whatever their exact value; without the floor a large dark
        population can make the two-phase fit split "dark versus the rest". A bright phase
        covering more than ``1 - dark_floor_quantile`` of the brain cannot be segmented.
        The fitted means and the energy refer to the floored channel.
    multiscale : bool, default True
        Choose the start and fit first on a 2x2x2-averaged copy (8 times fewer voxels), then
        warm-start the full-resolution fit from it. The final energy is that of the
        full-resolution problem either way.
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available). Default: the
        device of ``channels`` when it is a tensor, else the CPU.

    Returns
    -------
    probability : numpy.ndarray
        float32 array of the image shape, in [0, 1], 0 outside the brain: the foreground
        (bright-phase) probability of each voxel. ``probability >= 0.5`` is the hard
        segmentation.
    info : dict
        JSON-serialisable: ``n_iter`` (full-resolution primal-dual steps run),
        ``n_iter_coarse`` (those of the selected start on the coarse level), ``n_iter_soft``,
        ``converged`` (energy and gap criteria met at full resolution), ``energy`` (final
        binary Chan-Vese energy, robust variance units, floored data) and
        ``energy_history`` (one value per mean update), ``start`` (``"percentile"`` or
        ``"otsu"``) and ``start_energies`` (the energy each start reached), ``c_fg`` /
        ``c_bg`` (phase means per channel, input units; the bright channel floored),
        ``c_fg_bright`` / ``c_bg_bright`` (the same in the bright channel),
        ``within_variance`` (fitted within-phase variance per channel, robust units),
        ``epsilon`` (temperature used), ``foreground_fraction`` (share of brain voxels with
        ``u >= 0.5``), ``expected_fraction`` (mean of ``u`` in the brain),
        ``hard_agreement`` (Dice between the relaxed Chan-Vese and the soft map's
        segmentations), ``swapped`` (whether the fitted phases were swapped so that the
        foreground is the bright one), ``scale`` (robust scale per channel),
        ``dark_floor`` (the floor value, input units, or None), ``length_weight``,
        ``spacing``, ``seconds`` and ``device``.

    Raises
    ------
    InvalidImageError
        Wrong dimensionality or dtype, NaN/Inf in the brain, bad spacing, or a bright channel
        that is constant in the brain.
    SpaceMismatchError
        If the mask and image shapes differ.
    EmptyMaskError
        If the brain mask is empty.
    InvalidPriorError
        If a parameter is out of range.
    DeviceUnavailableError
        If CUDA is requested but not available.
    """
    t0 = time.perf_counter()
    lam = _check_length_weight(length_weight)
    eps_given = _check_epsilon(epsilon)
    max_iter = _check_int("n_iter", n_iter, 1)
    max_soft = _check_int("n_iter_soft", n_iter_soft, 0)
    every = _check_int("update_every", update_every, 1)
    tolerance = _check_number("tol", tol, allow_zero=True)
    soft_tol = 100.0 * tolerance
    floor_q = _check_floor_quantile(dark_floor_quantile)
    multiscale = _check_bool("multiscale", multiscale)
    q_init = _check_percentile(init_percentile)
    h = _check_spacing(spacing)
    bright = _check_int("bright_channel", bright_channel, 0)

    x_all = _as_tensor(channels, "channels")
    if x_all.is_complex():
        raise InvalidImageError(f"channels must hold real numbers, got dtype {x_all.dtype}")
    default_device = x_all.device if isinstance(channels, torch.Tensor) else torch.device("cpu")
    dev = _resolve_device(device, default_device)
    if x_all.dim() == 3:
        x_all = x_all.unsqueeze(0)
    if x_all.dim() != 4:
        raise InvalidImageError(
            f"channels must be a 3-D volume or (C, X, Y, Z), got shape {tuple(x_all.shape)}"
        )
    n_channels = int(x_all.shape[0])
    if bright >= n_channels:
        raise InvalidPriorError(
            f"bright_channel={bright} but the image has {n_channels} channel(s); "
            "pass the index of the channel in which lesions are bright (FLAIR, CT)"
        )
    mask_all = _as_tensor(brain_mask, "brain_mask")
    if tuple(mask_all.shape) != tuple(x_all.shape[1:]):
        raise SpaceMismatchError(
            f"brain mask shape {tuple(mask_all.shape)} differs from image shape "
            f"{tuple(x_all.shape[1:])}; pass a mask on the image grid"
        )
    mask_all = mask_all.to(torch.bool)
    if not bool(mask_all.any()):
        raise EmptyMaskError("the brain mask is empty; pass a mask that covers the brain")

    with torch.no_grad():
        # ---- crop to the brain's bounding box, move, check, rescale --------------------------
        box = tuple(
            slice(int(ix[0]), int(ix[-1]) + 1)
            for ix in (
                torch.nonzero(mask_all.any(dim=2).any(dim=1)).flatten(),
                torch.nonzero(mask_all.any(dim=2).any(dim=0)).flatten(),
                torch.nonzero(mask_all.any(dim=1).any(dim=0)).flatten(),
            )
        )
        mask = mask_all[box].to(dev)
        x = x_all[(slice(None), *box)].to(device=dev, dtype=torch.float32, copy=True)
        x[:, ~mask] = 0.0
        inside = x[:, mask]  # (C, N)
        if not bool(torch.isfinite(inside).all()):
            raise InvalidImageError(
                "the image holds NaN/Inf values inside the brain mask; fix or mask them first"
            )
        scales: list[float] = []
        for c in range(n_channels):
            values = inside[c]
            scale = float(_quantile(values, 0.75) - _quantile(values, 0.25)) / 1.349
            if not scale > 0:
                scale = float(values.std(unbiased=False))
            if not (scale > 0 and math.isfinite(scale)):
                if c == bright:
                    raise InvalidImageError(
                        f"the bright channel ({c}) is constant inside the brain mask, so there "
                        "is no bright phase to segment; check the image and the brain mask"
                    )
                scale = 1.0  # a constant channel adds the same cost to both phases
            scales.append(scale)
        scale_t = torch.tensor(scales, dtype=torch.float32, device=dev)
        floor = None if floor_q is None else float(_quantile(inside[bright], floor_q))
        if floor is not None:
            # The darkest voxels of the bright channel (CSF, sulci) are background whatever
            # their exact value; flooring them keeps a dark population from driving the split.
            x[bright].clamp_(min=floor)
            x[bright][~mask] = 0.0
        x.div_(scale_t.view(-1, 1, 1, 1))
        del inside
        fine = _Level(x, mask, h)

        # ---- label-free initialisation: two seeds, keep the lower Chan-Vese energy ----------
        bvals = x[bright][mask]
        seeds = {
            "percentile": _seed_above(bvals, _quantile(bvals, q_init / 100.0)),
            "otsu": _seed_above(bvals, _otsu_threshold(bvals)),
        }
        inside = x[:, mask]
        starts = []
        for name, seed in seeds.items():
            seed_f = seed.to(torch.float32)
            n_seed = float(seed_f.sum())
            if n_seed == 0 or n_seed == seed_f.numel():
                continue
            starts.append((
                name,
                (inside * seed_f).sum(dim=1) / n_seed,
                (inside * (1.0 - seed_f)).sum(dim=1) / (seed_f.numel() - n_seed),
            ))
        if not starts:
            raise InvalidImageError(
                f"the bright channel ({bright}) is constant inside the brain mask after flooring "
                f"it at its {floor_q} quantile: more than {1 - (floor_q or 0):.0%} of the brain "
                "shares its brightest value; pass dark_floor_quantile=None to fit without the floor"
            )
        del inside, bvals, seeds

        # ---- Chan-Vese fit: coarse level first, then the full resolution --------------------
        coarse = fine.coarsened() if multiscale else None
        first = coarse if coarse is not None else fine
        fits = {name: first.fit(c1, c2, lam, None, None, max_iter, every, tolerance)
                for name, c1, c2 in starts}
        start = min(fits, key=lambda name: fits[name]["history"][-1])
        fit = fits[start]
        start_energies = {name: float(f["history"][-1]) for name, f in fits.items()}
        del fits
        coarse_iter = 0
        if coarse is not None:
            c1, c2, coarse_iter = fit["c1"], fit["c2"], fit["n_iter"]
            # Only u and the means carry over: a nearest-upsampled dual field would have a
            # spurious divergence on the block edges, and p rebuilds in a few steps anyway.
            u0 = _upsample(fit["u"], mask.shape)
            del coarse, fit
            fit = fine.fit(c1, c2, lam, u0, None, max_iter, every, tolerance)
            del u0
        u, p, r, c1, c2 = fit["u"], fit["p"], fit["r"], fit["c1"], fit["c2"]
        history, done, converged = fit["history"], fit["n_iter"], fit["converged"]
        del fit
        grid, mask_f, n_vox = fine.grid, fine.mask_f, fine.n_vox

        # ---- the foreground is the phase that is brighter in the bright channel -------------
        swapped = bool(c1[bright] < c2[bright])
        if swapped:
            c1, c2 = c2, c1
            u = (1.0 - u).mul_(mask_f)
            r = _fidelity_difference(x, c1, c2, fine.outside)
            for pd in p:
                pd.neg_()
        hard_cv = (u >= 0.5) & mask
        # within-phase variance per channel (ML estimate): the fidelity term / (N C)
        within = max(fine.fidelity(hard_cv.to(torch.float32), r, c2), 0.0) / (n_vox * n_channels)
        eps = eps_given if eps_given is not None else 2.0 * within
        if not eps > 0:
            eps = 1e-3  # a perfectly piecewise-constant image: (almost) binary map

        # ---- soft map: entropy-smoothed problem at fixed means, FISTA on the dual ------------
        z = torch.empty_like(u)
        work = torch.empty_like(u)
        soft_steps = 0
        if lam > 0 and max_soft > 0:
            step = eps / sum(inv * inv for inv in grid.inv_h)
            steps = [step] * 3
            q = [pd.clone() for pd in p]
            t_k = 1.0
            previous = None
            for k in range(max_soft):
                grid.divergence(q, out=z)
                z.sub_(r).div_(eps)
                torch.sigmoid(z, out=work)
                grid.ascend(q, work, steps)
                _project(q, lam, work)  # q now holds the new iterate p_{k+1}
                t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t_k * t_k))
                beta = (t_k - 1.0) / t_next
                for pd, qd in zip(p, q):  # p <- p_{k+1} + beta (p_{k+1} - p_k): the next q
                    pd.mul_(-beta).add_(qd, alpha=1.0 + beta)
                p, q = q, p
                t_k = t_next
                soft_steps = k + 1
                if soft_steps % 10 == 0:
                    grid.divergence(p, out=z)
                    current = torch.sigmoid(z.sub_(r).div_(eps)).mul_(mask_f)
                    if previous is not None and float((current - previous).abs().max()) <= soft_tol:
                        break
                    previous = current
            grid.divergence(p, out=z)
            z.sub_(r)
        elif lam > 0:
            grid.divergence(p, out=z)
            z.sub_(r)
        else:
            torch.neg(r, out=z)
        prob = torch.sigmoid(z.div_(eps)).mul_(mask_f).clamp_(0.0, 1.0)
        hard_soft = (prob >= 0.5) & mask
        n_cv, n_soft = int(hard_cv.sum()), int(hard_soft.sum())
        n_both = int((hard_cv & hard_soft).sum())
        agreement = 1.0 if n_cv + n_soft == 0 else 2.0 * n_both / (n_cv + n_soft)
        fg_fraction = n_soft / n_vox
        expected = float(prob.sum()) / n_vox

        out = torch.zeros(tuple(mask_all.shape), dtype=torch.float32)
        out[box] = prob.cpu()
        probability = out.numpy()

    c_fg = (c1 * scale_t).cpu().tolist()
    c_bg = (c2 * scale_t).cpu().tolist()
    seconds = time.perf_counter() - t0
    if not converged:
        logger.info("Mumford-Shah: stopped after n_iter=%d steps before the energy settled "
                    "(relative change above tol=%g)", done, tolerance)
    if n_soft == 0:
        logger.warning("Mumford-Shah: no brain voxel reached foreground probability 0.5")
    logger.info(
        "Mumford-Shah: %d coarse + %d fine + %d soft steps, E=%.6g, foreground %.2f%% of the "
        "brain, c_fg=%s, c_bg=%s, eps=%.3g, %.1fs on %s", coarse_iter, done, soft_steps,
        history[-1], 100.0 * fg_fraction, [round(v, 3) for v in c_fg],
        [round(v, 3) for v in c_bg], eps, seconds, dev,
    )
    info: dict[str, Any] = {
        "n_iter": int(done),
        "n_iter_coarse": int(coarse_iter),
        "n_iter_soft": int(soft_steps),
        "converged": bool(converged),
        "energy": float(history[-1]),
        "energy_history": [float(e) for e in history],
        "c_fg": [float(v) for v in c_fg],
        "c_bg": [float(v) for v in c_bg],
        "c_fg_bright": float(c_fg[bright]),
        "c_bg_bright": float(c_bg[bright]),
        "within_variance": float(within),
        "epsilon": float(eps),
        "foreground_fraction": float(fg_fraction),
        "expected_fraction": float(expected),
        "hard_agreement": float(agreement),
        "swapped": swapped,
        "start": start,
        "start_energies": start_energies,
        "scale": [float(s) for s in scales],
        "dark_floor": None if floor is None else float(floor),
        "length_weight": float(lam),
        "spacing": [float(v) for v in h],
        "seconds": float(seconds),
        "device": str(dev),
    }
    return probability, info


# --------------------------------------------------------------------------------------------
# prior class
# --------------------------------------------------------------------------------------------


class MumfordShahPrior:
    """Mumford-Shah (Chan-Vese) foreground prior, the Table 1 baseline of ref. [26].

    Wraps :func:`mumford_shah_probability`: the volume is prepared with
    :func:`~cgc_refine.priors.base.prepare_prior_input` (robust standardisation for MRI,
    the brain window for CT), segmented into a bright and a dark phase, and returned as a
    :class:`~cgc_refine.priors.base.ProbabilityMap` whose values are the soft foreground
    indicator ``u`` (``u >= 0.5`` is the hard segmentation).

    Parameters are stored as given and validated by :meth:`compute` (scikit-learn style).

    Parameters
    ----------
    length_weight : float, default 3.0
        TV (boundary length) weight in robust-variance x mm (see
        :data:`DEFAULT_LENGTH_WEIGHT`).
    n_iter : int, default 150
        Maximum number of primal-dual steps of the Chan-Vese fit (per start and level).
    bright_channel : int, default 0
        Channel in which lesions are bright (FLAIR for MRI, the CT itself).
    modality : {"mri", "ct"}, default "mri"
        How the image is prepared (see ``prepare_prior_input``).
    device : str or torch.device, default "auto"
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    epsilon : float or None, default None
        Temperature of the soft map (robust-variance units); None: twice the fitted
        within-phase variance (the Gaussian two-phase posterior).
    tol : float, default 1e-4
        Convergence tolerance (relative energy change; the primal-dual gap and the soft map
        use ``100 * tol``), see :func:`mumford_shah_probability`.
    init_percentile : float, default 97
        Percentile of the bright channel above which voxels form one foreground seed.
    dark_floor_quantile : float or None, default 0.25
        Quantile of the bright channel at which it is floored (None: no floor).
    bias_correction : bool, default False
        Divide each MRI channel by its estimated smooth bias field before standardising
        (:func:`cgc_refine.brain.estimate_bias_field`; skipped for images that are not
        strictly positive); recorded in ``params["standardisation"]``.

    Examples
    --------
    >>> prior = MumfordShahPrior()                                   # doctest: +SKIP
    >>> pmap = prior.compute(flair_volume, brain_mask)               # doctest: +SKIP
    >>> hard = pmap.data >= 0.5                                      # doctest: +SKIP
    """

    def __init__(
        self,
        length_weight: float = DEFAULT_LENGTH_WEIGHT,
        n_iter: int = DEFAULT_N_ITER,
        bright_channel: int = 0,
        modality: str = "mri",
        device: str | torch.device = "auto",
        epsilon: float | None = None,
        tol: float = 1e-4,
        init_percentile: float = DEFAULT_INIT_PERCENTILE,
        dark_floor_quantile: float | None = DEFAULT_DARK_FLOOR_QUANTILE,
        bias_correction: bool = False,
    ) -> None:
        self.bias_correction = bias_correction
        self.length_weight = length_weight
        self.n_iter = n_iter
        self.bright_channel = bright_channel
        self.modality = modality
        self.device = device
        self.epsilon = epsilon
        self.tol = tol
        self.init_percentile = init_percentile
        self.dark_floor_quantile = dark_floor_quantile

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, as given."""
        return {
            "length_weight": self.length_weight,
            "n_iter": self.n_iter,
            "bright_channel": self.bright_channel,
            "modality": self.modality,
            "device": self.device,
            "epsilon": self.epsilon,
            "tol": self.tol,
            "init_percentile": self.init_percentile,
            "dark_floor_quantile": self.dark_floor_quantile,
            "bias_correction": self.bias_correction,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"MumfordShahPrior({args})"

    def _validate(self) -> torch.device:
        _check_length_weight(self.length_weight)
        _check_int("n_iter", self.n_iter, 1)
        _check_int("bright_channel", self.bright_channel, 0)
        _check_epsilon(self.epsilon)
        _check_number("tol", self.tol, allow_zero=True)
        _check_percentile(self.init_percentile)
        _check_floor_quantile(self.dark_floor_quantile)
        if self.modality not in ("mri", "ct"):
            raise InvalidPriorError(f"modality must be 'mri' or 'ct', got {self.modality!r}")
        return _resolve_device(self.device, torch.device("cpu"))

    def compute(self, volume: Any, brain_mask: np.ndarray | None = None) -> ProbabilityMap:
        """Compute the prior for one subject.

        Parameters
        ----------
        volume : Volume or numpy.ndarray
            The subject's image(s), channel-first when several.
        brain_mask : numpy.ndarray, optional
            Boolean brain mask; derived from the image when omitted.

        Returns
        -------
        ProbabilityMap
            Soft foreground indicator, 0 outside the brain, ``source="mumford-shah"``;
            ``params`` holds the settings, the fitted phase means and the solver summary.

        Raises
        ------
        InvalidPriorError
            If a parameter is invalid.
        DeviceUnavailableError
            If ``device`` asks for CUDA on a machine without it.
        InvalidImageError, EmptyMaskError, SpaceMismatchError
            If the image or mask cannot be used.
        """
        dev = self._validate()
        shape = np.shape(volume.data if hasattr(volume, "data") else volume)
        n_channels = int(shape[0]) if len(shape) == 4 else 1
        if int(self.bright_channel) >= n_channels:
            raise InvalidPriorError(
                f"bright_channel={self.bright_channel} but the image has {n_channels} "
                "channel(s); pass the index of the channel in which lesions are bright"
            )
        prepared = prepare_prior_input(
            volume, brain_mask, self.modality, bright_channel=int(self.bright_channel),
            bias_correction=bool(self.bias_correction),
        )
        channels = prepared.channels
        probability, info = mumford_shah_probability(
            channels,
            prepared.brain_mask,
            prepared.spacing,
            bright_channel=int(self.bright_channel),
            length_weight=float(self.length_weight),
            n_iter=int(self.n_iter),
            epsilon=_check_epsilon(self.epsilon),
            tol=float(self.tol),
            init_percentile=float(self.init_percentile),
            dark_floor_quantile=_check_floor_quantile(self.dark_floor_quantile),
            device=dev,
        )
        params: dict[str, Any] = {**self.get_params(), "device": str(dev)}
        params.update({k: v for k, v in info.items() if k not in params})
        params["n_iter_run"] = info["n_iter"]
        params["epsilon_used"] = info["epsilon"]
        params["device_used"] = info["device"]
        params["standardisation"] = prepared.standardisation
        return ProbabilityMap(
            np.clip(probability, 0.0, 1.0), prepared.affine, "mumford-shah", params
        )
