r"""Discretisation of the Chan-Vese problem of the Mumford-Shah prior.

Spacing-aware finite differences restricted to the brain (:class:`_Grid`), the projection on
the dual ball, the two label-free seeds (percentile, Otsu), and one resolution level of the
problem (:class:`_Level`) with its alternating primal-dual fit (:class:`_PrimalDual`, step 2
of the algorithm in ``docs/mumford_shah.md``). The stages that use them are in
:mod:`cgc_refine.priors._ms_solver`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("cgc_refine.priors.mumford_shah")


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
        max_iter: int,
        every: int,
        tol: float,
    ) -> _Fit:
        """Alternate Chambolle-Pock steps on u with mean updates until the energy settles.

        Every ``every`` primal-dual steps the means are set to their closed-form minimisers
        on the partition ``u >= 1/2`` and the binary energy is recorded; the fit stops when
        the relative energy change is below ``tol`` and the primal-dual gap below
        ``100 tol`` per voxel, or after ``max_iter`` steps.
        """
        r = _fidelity_difference(self.x, c1, c2, self.outside)
        if u is None:
            u = (r < 0).to(torch.float32)
        solver = _PrimalDual(self.grid, u.mul(self.mask_f), lam)
        history: list[float] = []
        converged = False
        done = 0
        while done < max_iter:
            n_steps = min(every, max_iter - done)
            solver.steps(r, n_steps)
            done += n_steps
            solver.u.mul_(self.mask_f)
            gap = solver.gap(r, self.mask_f) / self.n_vox
            # For fixed means, thresholding the relaxed minimiser gives the binary minimiser
            # (Chan, Esedoglu & Nikolova): update the means on that partition, where they are
            # exact, and track the binary energy. (Means weighted by a fractional u drift
            # towards each other.)
            hard = (solver.u >= 0.5).to(torch.float32)
            c1, c2 = self.means(hard, c1, c2)
            r = _fidelity_difference(self.x, c1, c2, self.outside)
            history.append(self.fidelity(hard, r, c2) + (lam * self.grid.tv(hard) if lam > 0 else 0.0))
            logger.debug("Mumford-Shah: %s voxels, step %d, E=%.8g, gap/voxel=%.3g",
                         tuple(solver.u.shape), done, history[-1], gap)
            settled = len(history) >= 2 and (
                abs(history[-2] - history[-1]) <= tol * max(abs(history[-1]), 1e-12)
            )
            if settled and gap <= 100.0 * tol:
                converged = True
                break
        return _Fit(solver.u, solver.p, r, c1, c2, history, done, converged)


@dataclass
class _Fit:
    """State of a Chan-Vese fit: indicator, dual field, fidelity difference, means, history."""

    u: torch.Tensor
    p: list[torch.Tensor]
    r: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor
    history: list[float]
    n_iter: int
    converged: bool


class _PrimalDual:
    """Chambolle-Pock iterations on the relaxed problem at fixed means.

    ``min_{u in [0,1]} max_{|p_v| <= lam} <r, u> + <p, grad_h u>`` with diagonal
    preconditioning: ``tau = 1 / (2 sum_d 1/h_d)``, ``sigma_d = h_d / 2`` (Pock & Chambolle
    2011). The iterates and work buffers are allocated once.
    """

    def __init__(self, grid: _Grid, u: torch.Tensor, lam: float) -> None:
        self.grid = grid
        self.lam = lam
        self.tau = 1.0 / (2.0 * sum(grid.inv_h))
        self.sigmas = [0.5 / inv for inv in grid.inv_h]
        self.u = u
        self.p = [torch.zeros_like(u) for _ in range(3)]
        self.u_bar = u.clone()
        self.u_new = torch.empty_like(u)
        self.force = torch.empty_like(u)
        self.work = torch.empty_like(u)

    def steps(self, r: torch.Tensor, n: int) -> None:
        """Run ``n`` primal-dual steps for the fidelity difference ``r``."""
        grid, lam, p, force = self.grid, self.lam, self.p, self.force
        u, u_new, u_bar = self.u, self.u_new, self.u_bar
        for _ in range(n):
            if lam > 0:
                grid.ascend(p, u_bar, self.sigmas)
                _project(p, lam, self.work)
                grid.divergence(p, out=force)
                force.sub_(r)
            else:
                torch.neg(r, out=force)
            torch.add(u, force, alpha=self.tau, out=u_new).clamp_(0.0, 1.0)
            torch.sub(u_new, u, out=u_bar).add_(u_new)  # over-relaxation: 2 u_new - u
            u, u_new = u_new, u
        self.u, self.u_new = u, u_new

    def gap(self, r: torch.Tensor, mask_f: torch.Tensor) -> float:
        """Primal-dual gap of the relaxed problem (uses ``force = div p - r`` of the last step)."""
        u = self.u
        if self.lam > 0:
            primal = float((u * r).sum()) + self.lam * self.grid.tv(u)
            dual = -float((self.force.clamp_(min=0.0) * mask_f).sum())
        else:
            primal = float((u * r).sum())
            dual = float((r.clamp(max=0.0) * mask_f).sum())
        return primal - dual


def _upsample(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling, cropped to ``shape``."""
    for axis in range(3):
        t = t.repeat_interleave(2, dim=axis)
    return t[: shape[0], : shape[1], : shape[2]].contiguous()
