"""Data-parallel training under ``torchrun``: process group, ranks and rank-0-only output.

cgc_refine trains with PyTorch's :class:`~torch.nn.parallel.DistributedDataParallel` when it
is launched by ``torchrun`` (which sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` for every
process); nothing changes for a plain ``python`` or ``cgc-refine`` process. One process runs
per GPU (``nccl``), or per CPU worker (``gloo``). Each rank samples its own crops from a
generator seeded by (seed, rank), gradients are averaged by DDP, and only rank 0 writes
checkpoints, models, outputs and INFO logs.

The contrastive term (eq. 6) is computed per rank over that rank's mini-patches; negatives
are not gathered across ranks. Gathering would make the loss of a step depend on the number
of processes (a larger contrast set changes both the value and the effective temperature of
the softmax), would need a differentiable all-gather, and would add a synchronisation
inside the loss; per-rank terms keep every rank's loss identical to the single-process loss
of its batch, and DDP's gradient averaging makes the step that of a batch
``world_size`` times larger, as for the BCE terms.

Launch lines (see README.md)::

    torchrun --standalone --nproc_per_node 4 -m cgc_refine fit --csv subjects.csv -o model.pt
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint host0:29400 --rdzv_id cgc -m cgc_refine fit ...
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .device import resolve_device
from .exceptions import DeviceUnavailableError

__all__ = [
    "DistributedContext",
    "launched_by_torchrun",
    "setup_distributed",
    "current_rank",
    "is_main_process",
    "barrier",
    "rank_seed",
]

logger = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a (possibly one-process) training job.

    Attributes
    ----------
    rank : int
        Global rank (0 for a single process).
    world_size : int
        Number of processes (1 for a single process).
    local_rank : int
        Rank on this node (selects the GPU).
    backend : str or None
        ``"nccl"``, ``"gloo"``, or None when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and INFO logs."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment variables describe a job of several processes."""
    if not all(name in os.environ for name in _ENV):
        return False
    try:
        return int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise DeviceUnavailableError(
            f"environment variable {name}={value!r} is not an integer; launch with torchrun"
        ) from None


def setup_distributed(device: str | torch.device = "auto") -> tuple[DistributedContext, torch.device]:
    """Join torchrun's process group (if launched by it) and pick this rank's device.

    Parameters
    ----------
    device : str or torch.device
        The requested device. Under torchrun, ``"auto"`` and ``"cuda"`` mean
        ``cuda:LOCAL_RANK`` when GPUs exist (backend ``nccl``) and the CPU otherwise
        (backend ``gloo``); ``"cpu"`` forces ``gloo``.

    Returns
    -------
    context : DistributedContext
        Rank, world size and backend (a default, single-process context without torchrun).
    device : torch.device
        Where this rank computes.

    Notes
    -----
    A process group that already exists (made by the caller) is used as it is. One created
    here is destroyed when the interpreter exits.
    """
    if not launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
        return DistributedContext(), resolve_device(device)
    if not dist.is_available():
        raise DeviceUnavailableError(
            "launched by torchrun, but this torch build has no torch.distributed; install a "
            "standard torch build or run a single process"
        )
    requested = str(device).strip().lower()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        backend = str(dist.get_backend())
    else:
        rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
        use_cuda = requested != "cpu" and torch.cuda.is_available()
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {requested!r} was requested under torchrun but CUDA is not available; "
                "use --device cpu (gloo) or auto"
            )
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
        if rank == 0:
            logger.info("distributed training: %d processes, backend %s", world, backend)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("the nccl process group needs CUDA, which is not available")
        chosen = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        chosen = torch.device("cpu") if requested in ("auto", "cpu") else resolve_device(device)
    return DistributedContext(rank, world, local_rank, backend), chosen


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current_rank() -> int:
    """This process's global rank: from the process group, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    except ValueError:
        return 0


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed job."""
    return current_rank() == 0


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if context.enabled and dist.is_initialized():
        dist.barrier()


def rank_seed(seed: int, rank: int, worker: int = 0) -> int:
    """A 63-bit seed for (seed, rank, data-loader worker), independent across the three."""
    words = np.random.SeedSequence([int(seed) % 2**63, int(rank), int(worker)]).generate_state(1, np.uint64)
    return int(words[0] >> np.uint64(1))
