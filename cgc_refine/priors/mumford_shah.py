r"""Two-phase piecewise-constant Mumford-Shah (Chan-Vese) foreground prior.

This is the Mumford-Shah baseline of the paper's Table 1 (ref. [26], Kim & Ye). The
piecewise-constant Mumford-Shah functional

``E(u, c1, c2) = sum_brain [u ||x - c1||^2 + (1 - u) ||x - c2||^2] + lambda TV_h(u)``

is minimised directly on the image, without a network, by convex optimisation in torch (on
the CPU, or on CUDA): a label-free start from two seeds of the bright channel, alternating
Chambolle-Pock steps and closed-form mean updates, the brighter phase as the foreground, and
an entropy-smoothed soft indicator as the probability map.

The derivation (energy, algorithm, how to read the map, performance) is in
`docs/mumford_shah.md <../../docs/mumford_shah.md>`_. This module validates the parameters
and holds the prior class; the solver is in :mod:`cgc_refine.priors._ms_solver` (its stages)
and :mod:`cgc_refine.priors._ms_discrete` (finite differences and the primal-dual fit).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._validation import check_spacing
from ..device import DeviceLike, resolve_device
from ..exceptions import (
    EmptyMaskError,
    InvalidImageError,
    InvalidPriorError,
    SpaceMismatchError,
)
from ._ms_solver import Settings, solve
from .base import Prior, ProbabilityMap, prepare_prior_input

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


def _resolve_device(device: DeviceLike | None, default: torch.device) -> torch.device:
    """The device of the solver; a malformed name is a parameter error of this prior."""
    return resolve_device(device, default=default, invalid=InvalidPriorError)


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
    device: DeviceLike | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    r"""Soft two-phase piecewise-constant Mumford-Shah (Chan-Vese) segmentation of the brain.

    Minimises the convex-relaxed Chan-Vese energy

    ``E(u, c1, c2) = sum_brain [u ||x - c1||^2 + (1 - u) ||x - c2||^2] + lambda TV_h(u)``,
    ``u`` in [0, 1],

    by alternating Chambolle-Pock steps on ``u`` with closed-form updates of the phase means,
    then returns the entropy-smoothed indicator ``u_eps = argmin_u E(u, c1, c2) + eps *
    sum [u log u + (1 - u) log(1 - u)]`` at the converged means (see ``docs/mumford_shah.md``
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
    settings = Settings(
        lam=_check_length_weight(length_weight),
        epsilon=_check_epsilon(epsilon),
        max_iter=_check_int("n_iter", n_iter, 1),
        max_soft=_check_int("n_iter_soft", n_iter_soft, 0),
        every=_check_int("update_every", update_every, 1),
        tol=_check_number("tol", tol, allow_zero=True),
        floor_q=_check_floor_quantile(dark_floor_quantile),
        multiscale=_check_bool("multiscale", multiscale),
        q_init=_check_percentile(init_percentile),
        spacing=check_spacing(spacing),
        bright=_check_int("bright_channel", bright_channel, 0),
    )
    x_all, mask_all, dev = _check_inputs(channels, brain_mask, device, settings.bright)
    return solve(x_all, mask_all, dev, settings)


def _check_inputs(
    channels: np.ndarray | torch.Tensor,
    brain_mask: np.ndarray | torch.Tensor,
    device: DeviceLike | None,
    bright: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.device]:
    """The channels as (C, X, Y, Z), the mask as a boolean tensor, and the solver's device.

    Raises the errors documented by :func:`mumford_shah_probability`.
    """
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
    return x_all, mask_all, dev


# --------------------------------------------------------------------------------------------
# prior class
# --------------------------------------------------------------------------------------------


class MumfordShahPrior(Prior):
    """Mumford-Shah (Chan-Vese) foreground prior, the Table 1 baseline of ref. [26].

    Wraps :func:`mumford_shah_probability`: the volume is prepared with
    :func:`~cgc_refine.preprocessing.prepare_prior_input` (robust standardisation for MRI,
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

    Notes
    -----
    :meth:`compute` returns a map with ``source="mumford-shah"``; its ``params`` hold the
    settings, the fitted phase means and the solver summary (``n_iter_run``,
    ``epsilon_used``, ``device_used`` and the ``info`` of :func:`mumford_shah_probability`).
    It raises :class:`~cgc_refine.exceptions.DeviceUnavailableError` when ``device`` asks
    for CUDA on a machine without it.

    Examples
    --------
    >>> prior = MumfordShahPrior()                                   # doctest: +SKIP
    >>> pmap = prior.compute(flair_volume, brain_mask)               # doctest: +SKIP
    >>> hard = pmap.data >= 0.5                                      # doctest: +SKIP
    """

    source = "mumford-shah"

    def __init__(
        self,
        length_weight: float = DEFAULT_LENGTH_WEIGHT,
        n_iter: int = DEFAULT_N_ITER,
        bright_channel: int = 0,
        modality: str = "mri",
        device: DeviceLike = "auto",
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

    def _validate(self) -> None:
        _check_length_weight(self.length_weight)
        _check_int("n_iter", self.n_iter, 1)
        _check_int("bright_channel", self.bright_channel, 0)
        _check_epsilon(self.epsilon)
        _check_number("tol", self.tol, allow_zero=True)
        _check_percentile(self.init_percentile)
        _check_floor_quantile(self.dark_floor_quantile)
        if self.modality not in ("mri", "ct"):
            raise InvalidPriorError(f"modality must be 'mri' or 'ct', got {self.modality!r}")

    def _compute(self, volume: Any, brain_mask: np.ndarray | None) -> ProbabilityMap:
        dev = _resolve_device(self.device, torch.device("cpu"))
        bright = self._check_bright_channel(volume)
        prepared = prepare_prior_input(
            volume, brain_mask, self.modality, bright_channel=bright,
            bias_correction=bool(self.bias_correction),
        )
        probability, info = mumford_shah_probability(
            prepared.channels,
            prepared.brain_mask,
            prepared.spacing,
            bright_channel=bright,
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
        return self._map(probability, prepared.affine, params)
