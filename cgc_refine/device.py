"""Compute-device selection and seeding.

Library code follows the device of the tensors it is given; only the refiner's ``fit`` and
``load`` resolve a device name, through :func:`resolve_device`.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from .exceptions import DeviceUnavailableError

__all__ = ["resolve_device", "seed_everything"]

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a torch.device) into a torch.device.

    ``"auto"`` picks the first CUDA GPU when one is present and the CPU otherwise (and logs
    the choice). An explicitly requested CUDA device that is absent is an error rather than
    a silent fall-back.

    Raises
    ------
    DeviceUnavailableError
        If CUDA (or device ``N``) is requested but not available.
    """
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("device auto -> %s", chosen)
        return chosen
    try:
        chosen = torch.device(name)
    except RuntimeError as error:
        raise DeviceUnavailableError(
            f"unknown device {device!r}; use auto, cpu, cuda or cuda:N"
        ) from error
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {name!r} was requested but CUDA is not available on this machine; "
                "use --device cpu (or auto)"
            )
        index = chosen.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {name!r} was requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist; pick another index"
            )
    elif chosen.type != "cpu":
        raise DeviceUnavailableError(f"device type {chosen.type!r} is not supported; use cpu or cuda")
    return chosen


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all CUDA devices included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
