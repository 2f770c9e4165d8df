r"""The numerical core of the Mumford-Shah (Chan-Vese) prior.

The derivation -- energy, primal-dual fit, start selection, entropy-smoothed soft map -- is in
``docs/mumford_shah.md``; :func:`cgc_refine.priors.mumford_shah.mumford_shah_probability`
validates its arguments and calls :func:`solve`, which runs the stages of that page in order:

1. :func:`prepare_problem` -- crop to the brain, floor the bright channel, rescale;
2. :func:`initial_means` -- the percentile and Otsu seeds (step 1 of the algorithm);
3. :func:`fit_chan_vese` -- alternating minimisation, coarse level first (step 2);
4. :func:`orient_foreground` -- the bright phase is the foreground (step 3);
5. :func:`soft_map` -- the entropy-smoothed indicator by FISTA on its dual (step 4).

Everything here runs on tensors of one device, under :func:`torch.no_grad` (see
:func:`solve`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..exceptions import InvalidImageError
from ._ms_discrete import (
    _Fit,
    _fidelity_difference,
    _Grid,
    _Level,
    _otsu_threshold,
    _project,
    _quantile,
    _seed_above,
    _upsample,
)

__all__ = ["Settings", "solve"]

logger = logging.getLogger("cgc_refine.priors.mumford_shah")


@dataclass(frozen=True)
class Settings:
    """Validated parameters of :func:`solve` (see ``mumford_shah_probability``).

    Attributes
    ----------
    lam : float
        TV weight ``lambda`` (robust variance x mm).
    epsilon : float or None
        Soft-map temperature; None: twice the fitted within-phase variance.
    max_iter, max_soft, every : int
        Primal-dual steps per fit, FISTA steps of the soft map, steps between mean updates.
    tol : float
        Relative energy change at which the fit stops.
    floor_q : float or None
        Quantile at which the bright channel is floored.
    multiscale : bool
        Select the start and fit first at half resolution.
    q_init : float
        Percentile of the bright channel that seeds the foreground.
    spacing : tuple of 3 float
        Voxel size in mm.
    bright : int
        Index of the bright channel.
    """

    lam: float
    epsilon: float | None
    max_iter: int
    max_soft: int
    every: int
    tol: float
    floor_q: float | None
    multiscale: bool
    q_init: float
    spacing: tuple[float, float, float]
    bright: int


# --------------------------------------------------------------------------------------------
# the stages of the solver
# --------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """The cropped, floored and rescaled problem at full resolution.

    Attributes
    ----------
    level : _Level
        Data (robust units), brain mask and grid of the brain's bounding box.
    box : tuple of 3 slice
        The bounding box in the input volume.
    scales : list of float
        Robust scale of each channel (input units).
    scale_t : torch.Tensor
        ``scales`` as a tensor on the solver's device.
    floor : float or None
        The floor of the bright channel (input units).
    """

    level: _Level
    box: tuple[slice, ...]
    scales: list[float]
    scale_t: torch.Tensor
    floor: float | None = field(default=None)


def _bounding_box(mask: torch.Tensor) -> tuple[slice, ...]:
    """Slices of the smallest box that holds every voxel of a non-empty 3-D mask."""
    return tuple(
        slice(int(ix[0]), int(ix[-1]) + 1)
        for ix in (
            torch.nonzero(mask.any(dim=2).any(dim=1)).flatten(),
            torch.nonzero(mask.any(dim=2).any(dim=0)).flatten(),
            torch.nonzero(mask.any(dim=1).any(dim=0)).flatten(),
        )
    )


def _robust_scales(inside: torch.Tensor, bright: int) -> list[float]:
    """IQR / 1.349 of each channel's brain values (the SD when the IQR is 0; 1 if constant).

    Raises
    ------
    InvalidImageError
        If the bright channel is constant inside the brain.
    """
    scales: list[float] = []
    for c in range(int(inside.shape[0])):
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
    return scales


def prepare_problem(
    x_all: torch.Tensor, mask_all: torch.Tensor, dev: torch.device, settings: Settings
) -> Problem:
    """Crop to the brain's bounding box, move to ``dev``, check, floor and rescale.

    Each channel is divided by its robust brain scale; the bright channel is first floored at
    its ``floor_q`` quantile (the darkest voxels are background whatever their value).

    Raises
    ------
    InvalidImageError
        For NaN/Inf inside the brain or a constant bright channel.
    """
    bright = settings.bright
    box = _bounding_box(mask_all)
    mask = mask_all[box].to(dev)
    x = x_all[(slice(None), *box)].to(device=dev, dtype=torch.float32, copy=True)
    x[:, ~mask] = 0.0
    inside = x[:, mask]  # (C, N)
    if not bool(torch.isfinite(inside).all()):
        raise InvalidImageError(
            "the image holds NaN/Inf values inside the brain mask; fix or mask them first"
        )
    scales = _robust_scales(inside, bright)
    scale_t = torch.tensor(scales, dtype=torch.float32, device=dev)
    floor_q = settings.floor_q
    floor = None if floor_q is None else float(_quantile(inside[bright], floor_q))
    if floor is not None:
        # The darkest voxels of the bright channel (CSF, sulci) are background whatever
        # their exact value; flooring them keeps a dark population from driving the split.
        x[bright].clamp_(min=floor)
        x[bright][~mask] = 0.0
    x.div_(scale_t.view(-1, 1, 1, 1))
    del inside
    return Problem(_Level(x, mask, settings.spacing), box, scales, scale_t, floor)


def initial_means(level: _Level, settings: Settings) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The phase means of the two label-free starts, the percentile and the Otsu seed.

    Returns
    -------
    list of (name, c1, c2)
        The starts whose seed is neither empty nor the whole brain.

    Raises
    ------
    InvalidImageError
        If neither seed splits the brain (the floored bright channel is constant).
    """
    x, mask, bright = level.x, level.mask, settings.bright
    bvals = x[bright][mask]
    seeds = {
        "percentile": _seed_above(bvals, _quantile(bvals, settings.q_init / 100.0)),
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
        floor_q = settings.floor_q
        raise InvalidImageError(
            f"the bright channel ({bright}) is constant inside the brain mask after flooring "
            f"it at its {floor_q} quantile: more than {1 - (floor_q or 0):.0%} of the brain "
            "shares its brightest value; pass dark_floor_quantile=None to fit without the floor"
        )
    return starts


def fit_chan_vese(
    fine: _Level, starts: list[tuple[str, torch.Tensor, torch.Tensor]], settings: Settings
) -> tuple[_Fit, dict[str, Any]]:
    """Fit every start (on the coarse level when ``multiscale``), keep the lowest energy,
    and refit it at full resolution from the upsampled indicator.

    Returns
    -------
    fit : _Fit
        The full-resolution fit.
    record : dict
        ``start``, ``start_energies`` and ``n_iter_coarse``.
    """
    lam, max_iter, every, tol = settings.lam, settings.max_iter, settings.every, settings.tol
    coarse = fine.coarsened() if settings.multiscale else None
    first = coarse if coarse is not None else fine
    fits = {name: first.fit(c1, c2, lam, None, max_iter, every, tol) for name, c1, c2 in starts}
    start = min(fits, key=lambda name: fits[name].history[-1])
    fit = fits[start]
    record: dict[str, Any] = {
        "start": start,
        "start_energies": {name: float(f.history[-1]) for name, f in fits.items()},
        "n_iter_coarse": 0,
    }
    del fits
    if coarse is not None:
        c1, c2, record["n_iter_coarse"] = fit.c1, fit.c2, fit.n_iter
        # Only u and the means carry over: a nearest-upsampled dual field would have a
        # spurious divergence on the block edges, and p rebuilds in a few steps anyway.
        u0 = _upsample(fit.u, fine.mask.shape)
        del coarse, first, fit
        fit = fine.fit(c1, c2, lam, u0, max_iter, every, tol)
    return fit, record


def orient_foreground(fit: _Fit, fine: _Level, bright: int) -> bool:
    """Make phase 1 the one that is brighter in the bright channel (in place).

    Returns
    -------
    bool
        Whether the fitted phases were swapped.
    """
    swapped = bool(fit.c1[bright] < fit.c2[bright])
    if swapped:
        fit.c1, fit.c2 = fit.c2, fit.c1
        fit.u = (1.0 - fit.u).mul_(fine.mask_f)
        fit.r = _fidelity_difference(fine.x, fit.c1, fit.c2, fine.outside)
        for pd in fit.p:
            pd.neg_()
    return swapped


def _fista(
    grid: _Grid, p: list[torch.Tensor], r: torch.Tensor, mask_f: torch.Tensor,
    lam: float, eps: float, max_soft: int, soft_tol: float,
) -> tuple[list[torch.Tensor], int]:
    """FISTA on the smooth dual of the entropy-smoothed problem, warm-started from ``p``.

    The step is ``eps / sum_d h_d**-2`` (the inverse Lipschitz constant of the dual
    gradient); every 10 steps the soft map is compared with the previous check and the loop
    stops when no voxel moved by more than ``soft_tol``. Returns the dual field and the
    number of steps run.
    """
    z = torch.empty_like(r)
    work = torch.empty_like(r)
    steps = [eps / sum(inv * inv for inv in grid.inv_h)] * 3
    q = [pd.clone() for pd in p]
    t_k = 1.0
    previous = None
    soft_steps = 0
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
    return p, soft_steps


def soft_map(fine: _Level, fit: _Fit, settings: Settings, eps: float) -> tuple[torch.Tensor, int]:
    """The entropy-smoothed indicator ``u_eps = sigmoid(-(r - div p) / eps)`` at fixed means.

    Returns
    -------
    probability : torch.Tensor
        The soft map on the cropped grid, 0 outside the brain.
    n_steps : int
        FISTA steps run.
    """
    grid, lam = fine.grid, settings.lam
    p, r = fit.p, fit.r
    z = torch.empty_like(fit.u)
    soft_steps = 0
    if lam > 0 and settings.max_soft > 0:
        p, soft_steps = _fista(grid, p, r, fine.mask_f, lam, eps, settings.max_soft,
                               100.0 * settings.tol)
    if lam > 0:
        grid.divergence(p, out=z)
        z.sub_(r)
    else:
        torch.neg(r, out=z)
    return torch.sigmoid(z.div_(eps)).mul_(fine.mask_f).clamp_(0.0, 1.0), soft_steps


def _temperature(
    fine: _Level, fit: _Fit, hard_cv: torch.Tensor, n_channels: int, given: float | None
) -> tuple[float, float]:
    """The within-phase variance per channel (ML estimate) and the soft-map temperature."""
    within = max(fine.fidelity(hard_cv.to(torch.float32), fit.r, fit.c2), 0.0) / (
        fine.n_vox * n_channels
    )
    eps = given if given is not None else 2.0 * within
    if not eps > 0:
        eps = 1e-3  # a perfectly piecewise-constant image: (almost) binary map
    return within, eps


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Dice between two hard maps (1 when both are empty) and the voxel count of ``b``."""
    n_a, n_b = int(a.sum()), int(b.sum())
    n_both = int((a & b).sum())
    return (1.0 if n_a + n_b == 0 else 2.0 * n_both / (n_a + n_b)), n_b


def solve(
    x_all: torch.Tensor, mask_all: torch.Tensor, dev: torch.device, settings: Settings
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the solver stages on validated inputs; see ``mumford_shah_probability``.

    Parameters
    ----------
    x_all : torch.Tensor
        (C, X, Y, Z) channels, any real dtype, any device.
    mask_all : torch.Tensor
        Boolean, non-empty (X, Y, Z) brain mask.
    dev : torch.device
        Where to compute.
    settings : Settings
        Validated parameters.

    Returns
    -------
    probability : numpy.ndarray
        float32 soft map of the input shape.
    info : dict
        The solver summary documented by ``mumford_shah_probability``.
    """
    t0 = time.perf_counter()
    n_channels = int(x_all.shape[0])
    with torch.no_grad():
        problem = prepare_problem(x_all, mask_all, dev, settings)
        fine = problem.level
        fit, record = fit_chan_vese(fine, initial_means(fine, settings), settings)
        swapped = orient_foreground(fit, fine, settings.bright)
        hard_cv = (fit.u >= 0.5) & fine.mask
        within, eps = _temperature(fine, fit, hard_cv, n_channels, settings.epsilon)
        prob, soft_steps = soft_map(fine, fit, settings, eps)
        agreement, n_soft = _agreement(hard_cv, (prob >= 0.5) & fine.mask)
        expected = float(prob.sum()) / fine.n_vox
        out = torch.zeros(tuple(mask_all.shape), dtype=torch.float32)
        out[problem.box] = prob.cpu()
        probability = out.numpy()
    info = _summary(problem, fit, record, settings, dev)
    info.update(
        n_iter_soft=int(soft_steps), within_variance=float(within), epsilon=float(eps),
        foreground_fraction=float(n_soft / fine.n_vox), expected_fraction=float(expected),
        hard_agreement=float(agreement), swapped=swapped,
    )
    info = _ordered(info, time.perf_counter() - t0)
    _log_result(info, settings, n_soft)
    return probability, info


_INFO_KEYS = (
    "n_iter", "n_iter_coarse", "n_iter_soft", "converged", "energy", "energy_history",
    "c_fg", "c_bg", "c_fg_bright", "c_bg_bright", "within_variance", "epsilon",
    "foreground_fraction", "expected_fraction", "hard_agreement", "swapped", "start",
    "start_energies", "scale", "dark_floor", "length_weight", "spacing", "seconds", "device",
)


def _summary(
    problem: Problem, fit: _Fit, record: dict[str, Any], settings: Settings, dev: torch.device
) -> dict[str, Any]:
    """The fit's part of the ``info`` record (means back in input units)."""
    bright = settings.bright
    c_fg = [float(v) for v in (fit.c1 * problem.scale_t).cpu().tolist()]
    c_bg = [float(v) for v in (fit.c2 * problem.scale_t).cpu().tolist()]
    return {
        "n_iter": int(fit.n_iter),
        "n_iter_coarse": int(record["n_iter_coarse"]),
        "converged": bool(fit.converged),
        "energy": float(fit.history[-1]),
        "energy_history": [float(e) for e in fit.history],
        "c_fg": c_fg,
        "c_bg": c_bg,
        "c_fg_bright": float(c_fg[bright]),
        "c_bg_bright": float(c_bg[bright]),
        "start": record["start"],
        "start_energies": record["start_energies"],
        "scale": [float(s) for s in problem.scales],
        "dark_floor": None if problem.floor is None else float(problem.floor),
        "length_weight": float(settings.lam),
        "spacing": [float(v) for v in settings.spacing],
        "device": str(dev),
    }


def _ordered(info: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``info`` with ``seconds`` added, in the documented key order."""
    info["seconds"] = float(seconds)
    return {key: info[key] for key in _INFO_KEYS}


def _log_result(info: dict[str, Any], settings: Settings, n_soft: int) -> None:
    if not info["converged"]:
        logger.info("Mumford-Shah: stopped after n_iter=%d steps before the energy settled "
                    "(relative change above tol=%g)", info["n_iter"], settings.tol)
    if n_soft == 0:
        logger.warning("Mumford-Shah: no brain voxel reached foreground probability 0.5")
    logger.info(
        "Mumford-Shah: %d coarse + %d fine + %d soft steps, E=%.6g, foreground %.2f%% of the "
        "brain, c_fg=%s, c_bg=%s, eps=%.3g, %.1fs on %s", info["n_iter_coarse"], info["n_iter"],
        info["n_iter_soft"], info["energy"], 100.0 * info["foreground_fraction"],
        [round(v, 3) for v in info["c_fg"]], [round(v, 3) for v in info["c_bg"]],
        info["epsilon"], info["seconds"], info["device"],
    )
