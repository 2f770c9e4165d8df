"""Training of the CGC network against prior pseudo-labels (paper sections 3 and 4.3).

Each subject is preprocessed once -- channels standardised inside the brain, cropped to the
brain's bounding box, prior and mask alongside -- and kept in memory as tensors (on the
training device when they fit) or on disk (:mod:`cgc_refine.cache`), so a step costs only the
crop, the flips and the network. Crops are drawn in the training process or, with
``num_workers > 0``, in data-loader worker processes that prepare the next batches while
the current step runs. Under ``torchrun`` the network is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` (see :mod:`cgc_refine.distributed`).
No ground truth appears anywhere in this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import TARGET_WEIGHTINGS, ConfigError, RefinerConfig
from .distributed import DistributedContext, rank_seed
from .model import CGCLoss, CGCUNet
from .augment import IntensityAugmentation
from .priors.base import ProbabilityMap, prepare_prior_input

__all__ = [
    "PreparedSubject",
    "prepare_subject",
    "effective_crop_size",
    "CropSampler",
    "CropStream",
    "TrainingResult",
    "build_network",
    "train_network",
    "training_step",
    "target_weights",
    "crop_in_voxels",
    "with_target",
    "TARGET_WEIGHTINGS",
]



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


logger = logging.getLogger(__name__)

#: Extra voxels kept around the brain's bounding box.
BBOX_MARGIN = 4


@dataclass
class PreparedSubject:
    """One subject, ready for training or inference.

    Attributes
    ----------
    image : torch.Tensor or array-like
        (C, x, y, z) float32 standardised channels inside the brain bounding box. A subject
        read from a :class:`~cgc_refine.cache.SubjectCache` holds
        :class:`~cgc_refine.cache.MappedArray` views of files instead of tensors (here and
        below); :class:`CropSampler` then reads only the crops, and :meth:`to` leaves such a
        subject where it is.
    prior : torch.Tensor, numpy.ndarray or None
        (1, x, y, z) float32 prior (None at inference).
    brain : torch.Tensor or numpy.ndarray
        (1, x, y, z) bool brain mask.
    bbox : tuple of slice
        Where the box sits in the original grid.
    shape : tuple of int
        Spatial shape of the original grid.
    foreground : numpy.ndarray or array-like
        (n, 3) voxel coordinates (inside the box) where the prior is >= 0.5, for crop
        oversampling; a random subset when there are many.
    info : dict
        JSON-serialisable facts recorded at preparation (the refiner stores the prior's
        provenance and the result of its informativeness check), kept by the cache.
    """

    image: Any
    prior: Any
    brain: Any
    bbox: tuple[slice, slice, slice]
    shape: tuple[int, int, int]
    foreground: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def on_disk(self) -> bool:
        """True for a subject read from the cache (arrays stay on disk)."""
        return not isinstance(self.image, torch.Tensor)

    def to(self, device: torch.device) -> "PreparedSubject":
        """Move the tensors to ``device`` (a disk-backed subject is returned unchanged)."""
        if self.on_disk:
            return self
        return PreparedSubject(
            self.image.to(device),  # type: ignore[union-attr]
            None if self.prior is None else self.prior.to(device),  # type: ignore[union-attr]
            self.brain.to(device), self.bbox, self.shape, self.foreground, self.info,  # type: ignore[union-attr]
        )

    def nbytes(self) -> int:
        """Memory held by the tensors (for a disk-backed subject: the bytes on disk)."""
        if self.on_disk:
            arrays = (self.image, self.brain, self.prior)
            return sum(int(a.nbytes) for a in arrays if a is not None)
        total = self.image.nelement() * 4 + self.brain.nelement()  # type: ignore[union-attr]
        return total + (0 if self.prior is None else self.prior.nelement() * 4)  # type: ignore[union-attr]


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        low = max(int(present[0]) - margin, 0)
        high = min(int(present[-1]) + 1 + margin, mask.shape[axis])
        slices.append(slice(low, high))
    return tuple(slices)  # type: ignore[return-value]


def prepare_subject(
    volume: Any,
    prior: ProbabilityMap | None,
    brain_mask: np.ndarray | None = None,
    modality: str = "mri",
    *,
    max_foreground: int = 200_000,
    seed: int = 0,
) -> PreparedSubject:
    """Standardise, crop to the brain and pack one subject into tensors.

    Parameters
    ----------
    volume : Volume or numpy.ndarray
        The subject's image(s).
    prior : ProbabilityMap or None
        Pseudo-label on the image grid (None for inference).
    brain_mask : numpy.ndarray, optional
        Boolean brain mask; derived when omitted.
    modality : {"mri", "ct"}
        Intensity handling (see :func:`cgc_refine.priors.base.prepare_prior_input`).
    max_foreground : int
        Cap on the stored foreground coordinates.
    seed : int
        Seed of that subsample.
    """
    prepared = prepare_prior_input(volume, brain_mask, modality)
    mask = prepared.brain_mask
    box = _bounding_box(mask, BBOX_MARGIN)
    image = torch.from_numpy(np.ascontiguousarray(prepared.channels[(slice(None), *box)]))
    brain = torch.from_numpy(np.ascontiguousarray(mask[box]))[None]
    prior_tensor = None
    foreground = np.zeros((0, 3), dtype=np.int64)
    if prior is not None:
        if prior.shape != mask.shape:
            from .exceptions import SpaceMismatchError

            raise SpaceMismatchError(
                f"prior shape {prior.shape} differs from image shape {mask.shape}; resample the "
                "prior onto the image grid"
            )
        prior_box = np.where(mask, prior.data, 0.0)[box].astype(np.float32)
        prior_tensor = torch.from_numpy(np.ascontiguousarray(prior_box))[None]
        foreground = np.argwhere(prior_box >= 0.5)
        if len(foreground) > max_foreground:
            rng = np.random.default_rng(seed)
            foreground = foreground[rng.choice(len(foreground), max_foreground, replace=False)]
    return PreparedSubject(image, prior_tensor, brain, box, tuple(mask.shape), foreground)  # type: ignore[arg-type]


def effective_crop_size(
    crop_size: Sequence[int], shapes: Sequence[Sequence[int]], factor: int | Sequence[int]
) -> tuple[int, int, int]:
    """The training crop: the configured size, no larger than the biggest subject needs.

    Along each axis ``a`` with factor ``f_a``: ``min(crop, largest extent rounded up to a
    multiple of f_a)``, then rounded down to a multiple of ``f_a`` (at least ``f_a``). Smaller
    subjects are zero-padded to it by the sampler.

    Parameters
    ----------
    crop_size : sequence of 3 int
        Configured crop (or sliding window) size.
    shapes : sequence of sequence of int
        Spatial shapes of the subjects.
    factor : int or sequence of 3 int
        The network's down-sampling factor: one int for every axis (the isotropic network,
        ``2 ** n_down``) or one per axis (``CGCUNet.downsample_factors``, e.g. ``(8, 8, 1)``
        for thick-slice data whose slice axis is not pooled).

    Returns
    -------
    tuple of 3 int
        The crop, a multiple of the factor along each axis.
    """
    from .model.geometry import as_factor_triple

    factors = as_factor_triple(factor)
    crop = []
    for axis in range(3):
        f = factors[axis]
        largest = max(int(s[axis]) for s in shapes)
        needed = int(math.ceil(largest / f) * f)
        size = min(int(crop_size[axis]), needed)
        crop.append(max(f, (size // f) * f))
    return tuple(crop)  # type: ignore[return-value]


def _take(array: Any, box: tuple[slice, ...]) -> torch.Tensor:
    """``array[:, box]`` as a tensor; a disk-backed array is read crop only."""
    crop = array[(slice(None), *box)]
    if isinstance(crop, np.ndarray):
        return torch.from_numpy(np.array(crop, order="C"))
    return crop


def crop_in_voxels(size_mm: Sequence[int], spacing: Sequence[float]) -> tuple[int, int, int]:
    """A crop or window given in millimetres (1 mm voxels) as voxels on a grid of ``spacing``.

    ``RefinerConfig.crop_size`` and ``inference_window`` are written for 1 mm voxels (the
    paper's 192x192x64 on BraTS); on 0.47x0.47x8 mm clinical FLAIR the same field of view is
    about 408x408x8 voxels. Rounded to whole voxels, at least 1 (callers then round to the
    network's per-axis factors with :func:`effective_crop_size`).
    """
    return tuple(max(1, int(round(float(k) / float(s)))) for k, s in zip(size_mm, spacing))  # type: ignore[return-value]


def with_target(subject: PreparedSubject, target: torch.Tensor, *, seed: int = 0,
                max_foreground: int = 200_000) -> PreparedSubject:
    """The subject with a new (1, x, y, z) training target inside its box; foreground recomputed."""
    foreground = np.argwhere(np.asarray(target[0].cpu()) >= 0.5)
    if len(foreground) > max_foreground:
        rng = np.random.default_rng(seed)
        foreground = foreground[rng.choice(len(foreground), max_foreground, replace=False)]
    return PreparedSubject(subject.image, target, subject.brain, subject.bbox, subject.shape, foreground,
                           dict(subject.info))


class CropSampler:
    """Random training crops with prior-guided oversampling and random flips.

    Parameters
    ----------
    subjects : sequence of PreparedSubject
        Training subjects with priors.
    crop_size : tuple of int
        Crop shape (see :func:`effective_crop_size`).
    foreground_oversampling : float
        Probability that a crop is centred on a voxel where the prior is >= 0.5.
    seed : int
        Seed of the sampler's generator (the only randomness of a step besides dropout-free
        network maths).
    augmentation : IntensityAugmentation, optional
        Per-channel intensity changes of the image (never of the target or the mask), drawn
        from a second generator seeded from ``seed``, so switching it on or off leaves the
        crops and flips unchanged; None leaves intensities as they are.
    """

    def __init__(
        self,
        subjects: Sequence[PreparedSubject],
        crop_size: tuple[int, int, int],
        foreground_oversampling: float = 0.5,
        seed: int = 0,
        augmentation: IntensityAugmentation | None = None,
    ) -> None:
        self.subjects = list(subjects)
        self.crop_size = crop_size
        self.foreground_oversampling = foreground_oversampling
        self.augmentation = augmentation
        self.rng = np.random.default_rng(seed)
        self.augmentation_rng = np.random.default_rng([seed, 1])

    def _crop(self, subject: PreparedSubject) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = subject.image.shape[1:]
        use_foreground = len(subject.foreground) > 0 and self.rng.random() < self.foreground_oversampling
        if use_foreground:
            centre = subject.foreground[self.rng.integers(len(subject.foreground))]
        else:
            centre = np.array([self.rng.integers(s) for s in shape])
        starts = [
            int(np.clip(c - k // 2, 0, max(s - k, 0))) for c, k, s in zip(centre, self.crop_size, shape)
        ]
        box = tuple(slice(st, st + k) for st, k in zip(starts, self.crop_size))
        image = _take(subject.image, box)
        prior = _take(subject.prior, box)
        brain = _take(subject.brain, box)
        pad = []
        for axis in (2, 1, 0):
            missing = self.crop_size[axis] - image.shape[axis + 1]
            pad += [missing // 2, missing - missing // 2]
        if any(pad):
            image = torch.nn.functional.pad(image, pad)
            prior = torch.nn.functional.pad(prior, pad)
            brain = torch.nn.functional.pad(brain, pad)
        flips = [axis + 1 for axis in range(3) if self.rng.random() < 0.5]
        if flips:
            image, prior, brain = (t.flip(flips) for t in (image, prior, brain))
        if self.augmentation is not None:
            image = self.augmentation(image, brain, self.augmentation_rng)
        return image, prior, brain

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``batch_size`` crops stacked: image (B,C,...), prior (B,1,...), brain (B,1,...)."""
        crops = [self._crop(self.subjects[self.rng.integers(len(self.subjects))]) for _ in range(batch_size)]
        return tuple(torch.stack(parts) for parts in zip(*crops))  # type: ignore[return-value]

    def state(self) -> dict[str, Any]:
        """Generator states (crops, and augmentation under ``"augmentation"``), for checkpoints."""
        return {**self.rng.bit_generator.state, "augmentation": self.augmentation_rng.bit_generator.state}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the generator states from :meth:`state`."""
        state = dict(state)
        augmentation = state.pop("augmentation", None)
        self.rng.bit_generator.state = state
        if augmentation is not None:
            self.augmentation_rng.bit_generator.state = augmentation


class CropStream(torch.utils.data.IterableDataset):
    """Endless training batches for a :class:`torch.utils.data.DataLoader` with workers.

    Every data-loader worker draws from its own :class:`CropSampler`, seeded by
    (``seed``, ``rank``, worker index + 1) through :func:`~cgc_refine.distributed.rank_seed`,
    so workers and ranks never repeat each other's crops. Use with ``batch_size=None``:
    each item is already a batch ``(image, prior, brain)``.

    Parameters
    ----------
    subjects : sequence of PreparedSubject
        Training subjects (in memory or on disk; disk-backed subjects are read crop by crop
        in the workers).
    crop_size : tuple of int
        Crop shape.
    batch_size : int
        Crops per batch.
    foreground_oversampling : float
        As for :class:`CropSampler`.
    seed, rank : int
        Seed of the job and rank of this process.
    """

    def __init__(
        self,
        subjects: Sequence[PreparedSubject],
        crop_size: tuple[int, int, int],
        batch_size: int,
        foreground_oversampling: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        augmentation: IntensityAugmentation | None = None,
    ) -> None:
        super().__init__()
        self.subjects = list(subjects)
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.foreground_oversampling = foreground_oversampling
        self.seed = seed
        self.rank = rank
        self.augmentation = augmentation

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id + 1
        sampler = CropSampler(self.subjects, self.crop_size, self.foreground_oversampling,
                              seed=rank_seed(self.seed, self.rank, worker), augmentation=self.augmentation)
        while True:
            yield sampler.batch(self.batch_size)


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


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def _batches(
    sampler: CropSampler, config: RefinerConfig, device: torch.device, context: DistributedContext,
    seed: int,
) -> Any:
    """The batch iterator: the sampler itself, or a DataLoader whose workers run it."""
    num_workers = config.num_workers
    in_memory_on_device = any(
        isinstance(s.image, torch.Tensor) and s.image.device.type != "cpu" for s in sampler.subjects
    )
    if num_workers <= 0 or in_memory_on_device:
        if num_workers > 0:
            logger.info("subjects live on %s; crops are drawn in-process (num_workers ignored)", device)
        while True:
            yield sampler.batch(config.batch_size)
    stream = CropStream(sampler.subjects, sampler.crop_size, config.batch_size,
                        sampler.foreground_oversampling, seed=seed, rank=context.rank,
                        augmentation=sampler.augmentation)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=4, persistent_workers=False,
    )
    yield from loader


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
    """
    context = context or DistributedContext()
    loss_fn = CGCLoss(
        lambda_cg=config.lambda_cg, lambda_fg=config.lambda_fg, temperature=config.temperature
    )
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    step_model: Any = _TrainForward(network)
    if context.enabled:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None,
        )
    if config.compile and device.type == "cuda":
        step_model = torch.compile(step_model)
    network.train()
    history: list[dict[str, float]] = []
    window: dict[str, list[float]] = {"total": [], "bce": [], "coarse": [], "fine": []}
    batches = _batches(sampler, config, device, context, seed)
    started = time.perf_counter()
    waited = 0.0
    steps = 0
    with contextlib.ExitStack() as stack:
        stack.callback(batches.close)  # stops data-loader workers
        if context.enabled:
            # DDP compares every gradient's strides with its bucket view; for the channels-last
            # 1x1x1 convolutions the two differ only along size-1 axes, where strides are
            # meaningless, and the resulting warning would be noise.
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        for iteration in range(start_iteration + 1, config.iterations + 1):
            tick = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - tick
            parts = training_step(step_model, loss_fn, optimizer, batch, device, config.amp,
                                  weighting=config.target_weighting)
            steps += 1
            values = {key: float(value) for key, value in parts.items()}
            for key in window:
                window[key].append(values.get(key, 0.0))
            if callback is not None and context.is_main:
                callback({"iteration": float(iteration), **values})
            if iteration % config.log_every == 0 or iteration == config.iterations:
                record = {key: float(np.mean(v)) for key, v in window.items()}
                record["iteration"] = float(iteration)
                record["seconds"] = time.perf_counter() - started
                record["data_wait_s"] = waited
                history.append(record)
                if context.is_main:
                    logger.info(
                        "iteration %d/%d  loss %.4f (bce %.4f, coarse %.4f, fine %.4f)",
                        iteration, config.iterations, record["total"], record["bce"],
                        record["coarse"], record["fine"],
                    )
                window = {key: [] for key in window}
            if (checkpoint is not None and checkpoint_every and iteration % checkpoint_every == 0
                    and context.is_main):
                checkpoint(iteration, optimizer.state_dict())
    if context.enabled:
        _broadcast_buffers(network)
    elapsed = time.perf_counter() - started
    network.eval()
    return TrainingResult(history, optimizer.state_dict(), steps, steps * config.batch_size, elapsed, waited)


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
    with _autocast(device, amp):
        output = model.forward_train(image) if isinstance(model, CGCUNet) else model(image)
    weight = target_weights(prior, weighting)
    total, parts = loss_fn(output, prior, brain, weight)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return parts
