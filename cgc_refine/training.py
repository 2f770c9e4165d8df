"""The training loop of the CGC network against prior pseudo-labels (paper sections 3 and 4.3).

:func:`train_network` optimises the network with Adam on the overall loss of equation 8,
one :func:`training_step` per batch from a :class:`~cgc_refine.sampling.CropSampler` (drawn
in-process or, with ``num_workers > 0``, in data-loader workers that prepare the next batches
while the current step runs); :func:`build_network` makes the network a configuration
describes, and :func:`plan_training` derives a run's crop, window, strides and sampler seed
from the prepared subjects. Under ``torchrun`` the network is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (see :mod:`cgc_refine.distributed`).
Subjects are prepared by :mod:`cgc_refine.data`; the names of that module and of
:mod:`cgc_refine.sampling` are re-exported here. No ground truth appears anywhere in this
module.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .augment import IntensityAugmentation
from .config import TARGET_WEIGHTINGS, ConfigError, RefinerConfig
from .data import (
    BBOX_MARGIN,
    PreparedSubject,
    crop_in_voxels,
    effective_crop_size,
    prepare_subject,
    with_target,
)
from .device import autocast
from .distributed import DistributedContext, rank_seed
from .model import CGCLoss, CGCUNet, anisotropic_strides, downsample_factors, isotropic_strides
from .sampling import CropSampler, CropStream, batch_iterator
from .weight_average import ExponentialWeightAverage, ema_decay

__all__ = [
    "PreparedSubject",
    "prepare_subject",
    "effective_crop_size",
    "CropSampler",
    "CropStream",
    "TrainingPlan",
    "plan_training",
    "TrainingResult",
    "build_network",
    "train_network",
    "training_step",
    "target_weights",
    "crop_in_voxels",
    "with_target",
    "TARGET_WEIGHTINGS",
    "BBOX_MARGIN",
]

logger = logging.getLogger(__name__)


def target_weights(prior: torch.Tensor, weighting: str) -> torch.Tensor | None:
    """Per-voxel weights of the BCE term from the pseudo-label's own confidence.

    ``"confidence"``: ``w = |2p - 1|``. A soft prior says how sure it is: a voxel at
    ``p = 0.5`` carries no information about its class (weight 0, it is ignored), one at 0 or
    1 counts fully, and the weight grows linearly in between. This is the classic
    noisy-label remedy of trusting a pseudo-label in proportion to its margin, without a
    hand-set ignore band; a hard (0/1) pseudo-label gets weight 1 everywhere, i.e. plain BCE.
    ``"none"``: no weights (plain eq. 1).

    Returns
    -------
    torch.Tensor or None
        Weights shaped like ``prior`` (None for ``"none"``).
    """
    if weighting == "none":
        return None
    if weighting == "confidence":
        return (2.0 * prior.float() - 1.0).abs()
    raise ConfigError(f"target weighting must be one of {TARGET_WEIGHTINGS}, got {weighting!r}")


def build_network(
    config: RefinerConfig,
    in_channels: int,
    strides: Sequence[Sequence[int]] | None = None,
) -> CGCUNet:
    """The CGC U-Net a configuration describes.

    Parameters
    ----------
    config : RefinerConfig
        Widths, CGC paths, mini-patch size, projection size and normalisation.
    in_channels : int
        Number of image channels.
    strides : sequence of sequence of 3 int, optional
        Per-level ``(sx, sy, sz)`` strides of the backbone, e.g.
        ``anisotropic_strides(spacing, len(config.channels) - 1)`` or the ``network.strides``
        stored in a checkpoint. None (default) halves every axis at every level.

    Returns
    -------
    CGCUNet
        The untrained network.
    """
    return CGCUNet(
        in_channels,
        channels=config.channels,
        use_coarse=config.use_coarse,
        use_fine=config.use_fine,
        patch_size=config.patch_size,
        proj_dim=config.proj_dim,
        norm=config.norm,
        strides=strides,
    )



@dataclass
class TrainingPlan:
    """What a training run trains with, besides the network.

    Attributes
    ----------
    subjects : list of PreparedSubject
        On the training device when they fit there.
    n_channels : int
        Image channels.
    spacing : tuple of float
        Median voxel spacing of the subjects (mm).
    strides : list of list of int or None
        Per-level strides of the network (None: isotropic); a resumed checkpoint's.
    crop, window : tuple of int
        Training crop and sliding window, in voxels.
    augmentation : IntensityAugmentation or None
        Intensity augmentation of the crops.
    sampler_seed : int
        Seed of the first round's crop sampler (rank-specific under torchrun).
    resume : dict or None
        The checkpoint to resume from.
    """

    subjects: list[PreparedSubject]
    n_channels: int
    spacing: tuple[float, ...]
    strides: list[list[int]] | None
    crop: tuple[int, int, int]
    window: tuple[int, int, int]
    augmentation: IntensityAugmentation | None
    sampler_seed: int
    resume: dict[str, Any] | None


def plan_training(
    subjects: Sequence[PreparedSubject], config: RefinerConfig, device: torch.device, context: DistributedContext,
    *, seed: int, resume: dict[str, Any] | None = None,
) -> TrainingPlan:
    """Device placement, spacing, strides, crop and window, and sampler settings of a run.

    Parameters
    ----------
    subjects : sequence of PreparedSubject
        The training subjects (moved to a CUDA ``device`` when they take under 4 GiB).
    config : RefinerConfig
        Widths (levels), ``anisotropic``, ``crop_size``, ``inference_window``,
        ``intensity_augmentation``.
    device : torch.device
        The training device.
    context : DistributedContext
        The job's ranks (each rank's sampler has its own seed).
    seed : int
        The estimator's ``random_state``.
    resume : dict, optional
        A checkpoint (:func:`cgc_refine.checkpoint.read_checkpoint`) whose strides the
        network keeps.
    """
    n_channels = int(subjects[0].image.shape[0])
    total_bytes = sum(s.nbytes() for s in subjects)
    if device.type == "cuda" and total_bytes < 4 * 2**30:
        subjects = [s.to(device) for s in subjects]
    spacing = tuple(float(v) for v in np.median([s.info.get("spacing", (1.0, 1.0, 1.0)) for s in subjects], axis=0))
    n_down = len(config.channels) - 1
    strides = [list(level) for level in anisotropic_strides(spacing, n_down)] if config.anisotropic else None
    if resume is not None:
        strides = resume.get("strides", None)
    shapes = [s.image.shape[1:] for s in subjects]
    factors = downsample_factors(strides if strides is not None else isotropic_strides(n_down))
    crop = effective_crop_size(crop_in_voxels(config.crop_size, spacing), shapes, factors)
    window = crop
    if config.inference_window is not None:
        window = effective_crop_size(crop_in_voxels(config.inference_window, spacing), shapes, factors)
    augmentation = IntensityAugmentation() if config.intensity_augmentation else None
    sampler_seed = rank_seed(seed, context.rank) if context.enabled else seed
    return TrainingPlan(list(subjects), n_channels, spacing, strides, crop, window, augmentation, sampler_seed,
                        resume)

@dataclass
class TrainingResult:
    """What :func:`train_network` returns.

    Attributes
    ----------
    history : list of dict
        Mean loss components over each ``log_every`` window, with the iteration, the elapsed
        seconds and the cumulative seconds spent waiting for data.
    optimizer_state : dict
        Final Adam state.
    steps : int
        Optimiser steps taken in this call.
    samples : int
        Crops consumed by this process (``steps * batch_size``).
    elapsed_s : float
        Wall time of the loop.
    data_wait_s : float
        Part of it spent waiting for the next batch (drawing crops in-process, or blocked on
        the data-loader workers).
    """

    history: list[dict[str, float]]
    optimizer_state: dict[str, Any]
    steps: int
    samples: int
    elapsed_s: float
    data_wait_s: float

    @property
    def data_wait_fraction(self) -> float:
        """``data_wait_s / elapsed_s`` (0 for an empty loop)."""
        return self.data_wait_s / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _broadcast_buffers(network: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics).

    DDP broadcasts buffers from rank 0 at the start of each forward pass, so during training
    every rank normalises with rank 0's statistics; the last step's update is local, and this
    makes the replicas identical again, parameters and buffers alike.
    """
    import torch.distributed as dist

    for buffer in network.buffers():
        dist.broadcast(buffer.data, src=0)


class _TrainForward(torch.nn.Module):
    """A module whose ``forward`` is the network's ``forward_train``.

    DistributedDataParallel and ``torch.compile`` act on ``forward``; training calls
    ``forward_train``, so this thin wrapper (sharing the network's parameters) is what they
    wrap.
    """

    def __init__(self, network: CGCUNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> Any:
        return self.network.forward_train(x)


def _step_model(network: CGCUNet, config: RefinerConfig, device: torch.device,
                context: DistributedContext) -> Any:
    """What a step calls: ``forward_train``, wrapped by DDP (several ranks) and compiled (CUDA)."""
    step_model: Any = _TrainForward(network)
    if context.enabled:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None,
        )
    if config.compile and device.type == "cuda":
        step_model = torch.compile(step_model)
    return step_model


class _LossLog:
    """Loss components averaged over windows of ``config.log_every`` steps.

    Parameters
    ----------
    config : RefinerConfig
        ``log_every`` and ``iterations``.
    context : DistributedContext
        Only the main rank logs.
    """

    def __init__(self, config: RefinerConfig, context: DistributedContext) -> None:
        self.config = config
        self.context = context
        self.history: list[dict[str, float]] = []
        self.window: dict[str, list[float]] = {"total": [], "bce": [], "coarse": [], "fine": []}

    def add(self, values: dict[str, float]) -> None:
        """Record one step's loss components (a missing one counts as 0)."""
        for key in self.window:
            self.window[key].append(values.get(key, 0.0))

    def close_window(self, iteration: int, seconds: float, data_wait_s: float) -> None:
        """At the end of a window (or of training), append its means to :attr:`history` and log them."""
        if iteration % self.config.log_every != 0 and iteration != self.config.iterations:
            return
        record = {key: float(np.mean(v)) for key, v in self.window.items()}
        record["iteration"] = float(iteration)
        record["seconds"] = seconds
        record["data_wait_s"] = data_wait_s
        self.history.append(record)
        if self.context.is_main:
            logger.info(
                "iteration %d/%d  loss %.4f (bce %.4f, coarse %.4f, fine %.4f)",
                iteration, self.config.iterations, record["total"], record["bce"],
                record["coarse"], record["fine"],
            )
        self.window = {key: [] for key in self.window}


def _ignore_ddp_stride_warning(stack: contextlib.ExitStack) -> None:
    """Silence DDP's gradient-stride warning for the rest of ``stack``.

    DDP compares every gradient's strides with its bucket view; for the channels-last 1x1x1
    convolutions the two differ only along size-1 axes, where strides are meaningless, and
    the resulting warning would be noise.
    """
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def train_network(
    network: CGCUNet,
    sampler: CropSampler,
    config: RefinerConfig,
    device: torch.device,
    *,
    start_iteration: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    callback: Callable[[dict[str, float]], None] | None = None,
    checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
    checkpoint_every: int = 0,
    context: DistributedContext | None = None,
    seed: int = 0,
) -> TrainingResult:
    """Optimise the network with Adam on the overall loss of equation 8.

    Parameters
    ----------
    network : CGCUNet
        The model, already on ``device``.
    sampler : CropSampler
        Source of training crops (used in-process; with ``config.num_workers > 0`` its
        subjects are handed to data-loader workers, each with its own generator).
    config : RefinerConfig
        Validated settings (iterations, batch size, learning rate, loss weights, amp,
        num_workers).
    device : torch.device
        Where the step runs.
    start_iteration : int
        Iterations already done (resuming).
    optimizer_state : dict, optional
        Adam state to resume from.
    callback : callable, optional
        Called after every step with ``{"iteration", "total", "bce", "coarse", "fine"}``
        (on rank 0 only).
    checkpoint : callable, optional
        ``checkpoint(iteration, optimizer_state)`` called every ``checkpoint_every`` steps
        (on rank 0 only).
    checkpoint_every : int
        0 disables periodic checkpoints.
    context : DistributedContext, optional
        The job's ranks; with more than one process the network is wrapped in
        DistributedDataParallel (gradients averaged over ranks; the contrastive term stays
        per rank, see :mod:`cgc_refine.distributed`).
    seed : int
        Seed of the data-loader workers' generators (with ``config.num_workers > 0``).

    Returns
    -------
    TrainingResult
        Loss history, final Adam state, and step / sample / data-wait counts.

    Notes
    -----
    With ``config.ema_horizon > 0`` the network's weights on return are the exponential
    average of the iterates (:class:`~cgc_refine.weight_average.ExponentialWeightAverage`),
    the EMA teacher; the Adam state is the last iterate's. A resumed run starts its average
    afresh from the resumed weights.
    """
    context = context or DistributedContext()
    loss_fn = CGCLoss(
        lambda_cg=config.lambda_cg, lambda_fg=config.lambda_fg, temperature=config.temperature
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    step_model = _step_model(network, config, device, context)
    network.train()
    log = _LossLog(config, context)
    batches = batch_iterator(sampler, config, device, context, seed)
    decay = ema_decay(getattr(config, "ema_horizon", 0.0), config.iterations)
    teacher = ExponentialWeightAverage(network, decay) if decay > 0 else None
    started = time.perf_counter()
    waited = 0.0
    steps = 0
    with contextlib.ExitStack() as stack:
        stack.callback(batches.close)  # stops data-loader workers
        if context.enabled:
            _ignore_ddp_stride_warning(stack)
        for iteration in range(start_iteration + 1, config.iterations + 1):
            tick = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - tick
            parts = training_step(step_model, loss_fn, optimizer, batch, device, config.amp,
                                  weighting=config.target_weighting)
            steps += 1
            if teacher is not None:
                teacher.update(network)
            values = {key: float(value) for key, value in parts.items()}
            log.add(values)
            if callback is not None and context.is_main:
                callback({"iteration": float(iteration), **values})
            log.close_window(iteration, time.perf_counter() - started, waited)
            if (checkpoint is not None and checkpoint_every and iteration % checkpoint_every == 0
                    and context.is_main):
                checkpoint(iteration, optimizer.state_dict())
    if teacher is not None and teacher.updates:
        teacher.copy_to(network)
    if context.enabled:
        _broadcast_buffers(network)
    elapsed = time.perf_counter() - started
    network.eval()
    return TrainingResult(log.history, optimizer.state_dict(), steps, steps * config.batch_size, elapsed, waited)


def training_step(
    model: Any,
    loss_fn: CGCLoss,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    device: torch.device,
    amp: bool,
    *,
    weighting: str = "none",
) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch (image, prior, brain mask); returns the loss parts.

    ``model`` is a module whose ``forward`` returns :class:`~cgc_refine.model.CGCOutput`
    (the network's ``forward_train``, possibly wrapped by DDP or ``torch.compile``); a bare
    :class:`CGCUNet` is used through its ``forward_train``. Inputs go to ``device`` in
    channels-last layout; the forward pass runs under bf16 autocast on CUDA when ``amp`` is
    set (the losses compute in float32 regardless). ``weighting`` selects the per-voxel
    weights of the BCE term (:func:`target_weights`).
    """
    image, prior, brain = (t.to(device, non_blocking=True) for t in batch)
    image = image.contiguous(memory_format=torch.channels_last_3d)
    with autocast(device, torch.bfloat16 if amp else None):
        output = model.forward_train(image) if isinstance(model, CGCUNet) else model(image)
    weight = target_weights(prior, weighting)
    total, parts = loss_fn(output, prior, brain, weight)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return parts
