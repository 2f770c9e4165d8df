"""Saved models and training checkpoints: what a file is, and loading it for prediction."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from ..exceptions import CheckpointError, ConfigError

__all__ = ["checkpoint_facts", "load_model", "resume_checkpoint"]

logger = logging.getLogger("cgc_refine.workflow")


def checkpoint_facts(path: Path) -> dict[str, Any]:
    """What a saved file is: a finished model (:meth:`Refiner.save`) or a periodic training
    checkpoint (it carries the optimiser state), and how far its training went.

    A checkpoint counts as complete when it was written at the last iteration of a one-round
    training; with several self-training rounds the round it belongs to is not recorded.

    Raises
    ------
    CheckpointError
        When the file is missing, unreadable or not a cgc_refine model.
    """
    from ..checkpoint import read_checkpoint

    state = read_checkpoint(path)
    config = state.get("config") or {}
    n_iter = int(state.get("n_iter", 0))
    iterations = int(config.get("iterations", n_iter))
    rounds = int(config.get("rounds", 1))
    return {
        "training_checkpoint": state.get("optimizer_state") is not None,
        "n_iter": n_iter,
        "iterations": iterations,
        "rounds": rounds,
        "random_state": state.get("random_state"),
        "complete": n_iter >= iterations and rounds == 1,
    }


def _rounds_text(facts: dict[str, Any]) -> str:
    return f", in a {facts['rounds']}-round self-training" if facts["rounds"] > 1 else ""


def load_model(path: Path, device: str) -> Any:
    """:meth:`Refiner.load` for a job: a folder is called a folder, a training checkpoint is
    refused unless its training finished, and warnings torch gives while reading a file that
    then proves not to be a model are dropped (the error says what is wrong); warnings of a
    model that loads are shown as usual.

    Raises
    ------
    CheckpointError
    """
    from ..refiner import Refiner

    if path.is_dir():
        raise CheckpointError(
            f"model file '{path}' is a folder; pass the model file inside it (written by "
            "'cgc-refine fit -o MODEL.pt' or --save-model)"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts = checkpoint_facts(path)
        if facts["training_checkpoint"] and not facts["complete"]:
            raise CheckpointError(
                f"'{path}' is a training checkpoint (iteration {facts['n_iter']} of "
                f"{facts['iterations']}{_rounds_text(facts)}), written by 'fit --checkpoint-every' "
                "so that an interrupted fit can continue, not a finished model; finish the "
                "training by running the same fit command again with --resume, then pass the "
                "model it writes"
            )
        refiner = Refiner.load(str(path), device=device)
    for item in caught:
        warnings.showwarning(item.message, item.category, item.filename, item.lineno)
    if facts["training_checkpoint"]:
        logger.warning("'%s' is the training checkpoint of a finished training (iteration %d of %d); "
                       "using it as the model", path, facts["n_iter"], facts["iterations"])
    return refiner


def resume_checkpoint(path: Path, *, seed: int, rounds: int) -> Path:
    """The checkpoint ``fit --resume`` continues from, after checking that it can.

    Raises
    ------
    CheckpointError
        When there is no checkpoint, it is not one, or it was written with another seed.
    ConfigError
        With several self-training rounds (a checkpoint does not record its round).
    """
    if rounds > 1:
        raise ConfigError(
            "--resume continues a one-round training only (a checkpoint does not record which "
            "self-training round it belongs to); drop --resume or --rounds"
        )
    if not path.is_file():
        raise CheckpointError(
            f"--resume: there is no checkpoint '{path}' to continue from (fit writes it with "
            "--checkpoint-every N and removes it when it finishes); drop --resume to start afresh"
        )
    facts = checkpoint_facts(path)
    if not facts["training_checkpoint"]:
        raise CheckpointError(
            f"--resume: '{path}' is a finished model, not a training checkpoint; drop --resume "
            "(or move the file away) to train afresh"
        )
    if facts["random_state"] is not None and int(facts["random_state"]) != seed:
        raise CheckpointError(
            f"--resume: the checkpoint '{path}' was written by a fit with --seed "
            f"{facts['random_state']}, this one has --seed {seed}; resume with the same options"
        )
    logger.info("resuming from '%s' (iteration %d of %d)", path, facts["n_iter"], facts["iterations"])
    return path
