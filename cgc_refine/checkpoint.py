"""The model file: what :meth:`Refiner.save <cgc_refine.refiner.Refiner.save>` writes and ``load`` reads.

A model (or a periodic training checkpoint) is one :func:`torch.save` file holding a dict,
read back with ``weights_only=True``:

- ``format`` (:data:`CHECKPOINT_FORMAT`) and ``cgc_refine_version``;
- ``config``: :meth:`RefinerConfig.to_dict <cgc_refine.config.RefinerConfig.to_dict>`;
- ``state_dict``: the network's weights (on the CPU);
- ``n_channels_in``, ``strides`` (None: isotropic), ``spacing``, ``crop_size``,
  ``window_size``: the network's input and geometry;
- ``modality``, ``random_state``, ``n_iter``, ``priors``, ``history``: the estimator's
  settings and what training did;
- ``optimizer_state`` and ``sampler_state``: set in periodic checkpoints only, to resume.

Readers accept any file of this format or an older one; later keys (``spacing``,
``window_size``, ``strides``) fall back to what older files implied.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from ._utils import atomic_write, jsonable
from ._version import __version__
from .config import RefinerConfig
from .exceptions import CheckpointError
from .training import build_network

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_state", "write_checkpoint", "read_checkpoint",
           "check_compatible", "resume_training", "restore_refiner"]

logger = logging.getLogger(__name__)

#: Version of the checkpoint layout written by :meth:`Refiner.save <cgc_refine.refiner.Refiner.save>`.
CHECKPOINT_FORMAT = 1

#: The architecture settings a resumed run must share with its checkpoint.
ARCHITECTURE_FIELDS = ("channels", "norm", "use_coarse", "use_fine", "patch_size", "proj_dim")

R = TypeVar("R")


def checkpoint_state(refiner: Any, *, optimizer_state: Any = None, sampler_state: Any = None) -> dict[str, Any]:
    """The dict a fitted refiner is saved as.

    Parameters
    ----------
    refiner : Refiner
        A fitted estimator (``network_``, ``config_``, ``n_channels_in_``, ``crop_size_``,
        ``window_size_``, ``n_iter_``, ``priors_``, ``history_``; ``strides_`` and
        ``spacing_`` when present).
    optimizer_state, sampler_state : optional
        Adam's and the crop sampler's states (periodic checkpoints).

    Returns
    -------
    dict
        The checkpoint, weights on the CPU.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "cgc_refine_version": __version__,
        "config": refiner.config_.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in refiner.network_.state_dict().items()},
        "n_channels_in": int(refiner.n_channels_in_),
        "strides": getattr(refiner, "strides_", None),
        "spacing": list(getattr(refiner, "spacing_", (1.0, 1.0, 1.0))),
        "crop_size": list(refiner.crop_size_),
        "window_size": list(refiner.window_size_),
        "modality": refiner.modality,
        "random_state": int(refiner.random_state),
        "n_iter": int(refiner.n_iter_),
        "priors": jsonable(refiner.priors_),
        "history": jsonable(refiner.history_),
        "optimizer_state": optimizer_state,
        "sampler_state": jsonable(sampler_state),
    }


def write_checkpoint(path: str | os.PathLike[str], state: dict[str, Any], *, overwrite: bool) -> Path:
    """Write ``state`` atomically to ``path`` (:class:`CheckpointError` when that fails)."""
    target = Path(path)
    atomic_write(target, lambda handle: torch.save(state, handle), overwrite=overwrite, binary=True,
                 what="model", error=CheckpointError)
    return target


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict of a model file, checked to be a cgc_refine model of a known format.

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable, not a cgc_refine model, or of a newer format.
    """
    target = Path(path)
    if not target.is_file():
        raise CheckpointError(f"model file {target} does not exist; check the path")
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(
            f"{target} cannot be read as a cgc_refine model ({type(error).__name__}); the file is "
            "corrupted or not a model written by cgc-refine"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state or "config" not in state:
        raise CheckpointError(f"{target} is not a cgc_refine model (missing weights or configuration)")
    if int(state.get("format", -1)) > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{target} was written by a newer cgc_refine (format {state.get('format')}); upgrade cgc_refine"
        )
    return state


def check_compatible(state: dict[str, Any], config: RefinerConfig, n_channels: int) -> None:
    """Refuse to resume from a checkpoint whose network differs from ``config``'s or the data's.

    Raises
    ------
    CheckpointError
        If an architecture setting, the anisotropy or the channel count differ.
    """
    saved = RefinerConfig.from_dict(state["config"])
    if any(getattr(saved, name) != getattr(config, name) for name in ARCHITECTURE_FIELDS):
        raise CheckpointError("the checkpoint's network settings differ from this configuration; resume with the same config")
    if state.get("strides") is not None and config.anisotropic is False:
        raise CheckpointError("the checkpoint's network is anisotropic; resume with anisotropic=True")
    if int(state["n_channels_in"]) != n_channels:
        raise CheckpointError(
            f"the checkpoint was trained on {state['n_channels_in']} channel(s), the data have {n_channels}"
        )



def resume_training(state: dict[str, Any], config: RefinerConfig, n_channels: int, network: torch.nn.Module,
                    sampler: Any, *, distributed: bool) -> tuple[int, dict[str, Any] | None]:
    """Continue training from a periodic checkpoint (or a saved model).

    Parameters
    ----------
    state : dict
        From :func:`read_checkpoint`.
    config : RefinerConfig
        The resumed run's settings (checked by :func:`check_compatible`).
    n_channels : int
        Image channels of the resumed run's data.
    network : CGCUNet
        Receives the checkpoint's weights.
    sampler : CropSampler
        Receives the checkpoint's generator states, unless ``distributed`` (every rank draws
        from its own generator then, and the checkpoint holds rank 0's).
    distributed : bool
        Whether the run has several processes.

    Returns
    -------
    start_iteration : int
        Iterations already done.
    optimizer_state : dict or None
        Adam's state (None in a saved model).
    """
    check_compatible(state, config, n_channels)
    network.load_state_dict(state["state_dict"])
    start_iteration = int(state.get("n_iter", 0))
    if state.get("sampler_state") is not None and not distributed:
        sampler.set_state(state["sampler_state"])
    logger.info("resuming from iteration %d", start_iteration)
    return start_iteration, state.get("optimizer_state")

def restore_refiner(cls: type[R], state: dict[str, Any], path: str | os.PathLike[str], device: str,
                    resolved: torch.device) -> R:
    """A fitted estimator of class ``cls`` from a checkpoint dict.

    Parameters
    ----------
    cls : type
        :class:`~cgc_refine.refiner.Refiner` (or a subclass).
    state : dict
        From :func:`read_checkpoint`.
    path : path
        Where it was read from (for messages).
    device : str
        The estimator's ``device`` parameter.
    resolved : torch.device
        That device, resolved; the network is moved there.

    Raises
    ------
    CheckpointError
        If the dict lacks a key or its weights do not fit the network it describes.
    """
    try:
        config = RefinerConfig.from_dict(state["config"])
        refiner: Any = cls(prior=None, config=config, modality=state["modality"], device=device,  # type: ignore[call-arg]
                           random_state=int(state["random_state"]))
        network = build_network(config, int(state["n_channels_in"]), strides=state.get("strides"))
        network.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a usable cgc_refine model ({error}); retrain or re-save it") from None
    refiner.network_ = network.to(resolved).to(memory_format=torch.channels_last_3d).eval()
    refiner.config_ = config
    refiner.device_ = resolved
    refiner.n_channels_in_ = int(state["n_channels_in"])
    refiner.strides_ = state.get("strides")
    refiner.spacing_ = tuple(state.get("spacing", (1.0, 1.0, 1.0)))
    refiner.crop_size_ = tuple(state["crop_size"])
    refiner.window_size_ = tuple(state.get("window_size", state["crop_size"]))
    refiner.n_iter_ = int(state["n_iter"])
    refiner.priors_ = state.get("priors", [])
    refiner.history_ = state.get("history", [])
    return refiner  # type: ignore[no-any-return]
