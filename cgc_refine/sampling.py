"""Training crops: random, prior-guided crops with flips, drawn in-process or in workers.

:class:`CropSampler` draws one batch at a time from prepared subjects (in memory or on disk,
where only the crop is read); :class:`CropStream` runs one sampler per data-loader worker so
the next batches are prepared while the current step runs; :func:`batch_iterator` picks
between the two for the training loop. No ground truth appears in this module.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .augment import IntensityAugmentation
from .config import RefinerConfig
from .data import PreparedSubject
from .distributed import DistributedContext, rank_seed

__all__ = ["CropSampler", "CropStream", "batch_iterator"]

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _take(array: Any, box: tuple[slice, ...]) -> torch.Tensor:
    """``array[:, box]`` as a tensor; a disk-backed array is read crop only."""
    crop = array[(slice(None), *box)]
    if isinstance(crop, np.ndarray):
        return torch.from_numpy(np.array(crop, order="C"))
    return crop


class CropSampler:
    """Random training crops with prior-guided oversampling and random flips.

    Parameters
    ----------
    subjects : sequence of PreparedSubject
        Training subjects with priors.
    crop_size : tuple of int
        Crop shape (see :func:`~cgc_refine.data.effective_crop_size`).
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

    def _box(self, subject: PreparedSubject) -> tuple[slice, ...]:
        """The crop's box, centred on a prior foreground voxel (``foreground_oversampling``) or any voxel."""
        shape = subject.image.shape[1:]
        use_foreground = len(subject.foreground) > 0 and self.rng.random() < self.foreground_oversampling
        if use_foreground:
            centre = subject.foreground[self.rng.integers(len(subject.foreground))]
        else:
            centre = np.array([self.rng.integers(s) for s in shape])
        starts = [
            int(np.clip(c - k // 2, 0, max(s - k, 0))) for c, k, s in zip(centre, self.crop_size, shape)
        ]
        return tuple(slice(st, st + k) for st, k in zip(starts, self.crop_size))

    def _crop(self, subject: PreparedSubject) -> Batch:
        """One crop of the subject: read, zero-padded to the crop size, flipped, augmented."""
        box = self._box(subject)
        image, prior, brain = (_take(array, box) for array in (subject.image, subject.prior, subject.brain))
        pad = []
        for axis in (2, 1, 0):
            missing = self.crop_size[axis] - image.shape[axis + 1]
            pad += [missing // 2, missing - missing // 2]
        if any(pad):
            image, prior, brain = (torch.nn.functional.pad(t, pad) for t in (image, prior, brain))
        flips = [axis + 1 for axis in range(3) if self.rng.random() < 0.5]
        if flips:
            image, prior, brain = (t.flip(flips) for t in (image, prior, brain))
        if self.augmentation is not None:
            image = self.augmentation(image, brain, self.augmentation_rng)
        return image, prior, brain

    def batch(self, batch_size: int) -> Batch:
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
    augmentation : IntensityAugmentation, optional
        As for :class:`CropSampler`.
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

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id + 1
        sampler = CropSampler(self.subjects, self.crop_size, self.foreground_oversampling,
                              seed=rank_seed(self.seed, self.rank, worker), augmentation=self.augmentation)
        while True:
            yield sampler.batch(self.batch_size)


def batch_iterator(
    sampler: CropSampler, config: RefinerConfig, device: torch.device, context: DistributedContext,
    seed: int,
) -> Iterator[Batch]:
    """The training batches: from the sampler itself, or from a DataLoader whose workers run it.

    Parameters
    ----------
    sampler : CropSampler
        Used in-process; with ``config.num_workers > 0`` (and subjects not already on an
        accelerator) its subjects and settings are handed to :class:`CropStream` workers.
    config : RefinerConfig
        ``num_workers`` and ``batch_size``.
    device : torch.device
        The training device (pinned memory on CUDA).
    context : DistributedContext
        The job's ranks (seeds the workers' generators).
    seed : int
        Seed of the job.

    Returns
    -------
    iterator of (image, prior, brain)
        Endless; ``close()`` it to stop data-loader workers.
    """
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
