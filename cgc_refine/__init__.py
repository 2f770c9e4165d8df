"""cgc_refine: unsupervised lesion segmentation refined by cross-granularity contrast."""

from ._version import __version__
from .exceptions import (
    CGCRefineError,
    CheckpointError,
    DeviceUnavailableError,
    EmptyMaskError,
    InvalidImageError,
    InvalidPriorError,
    OutputExistsError,
    OutputNotWritableError,
    SpaceMismatchError,
)

__all__ = [
    "__version__",
    "Refiner",
    "RefinerConfig",
    "CGCRefineError",
    "CheckpointError",
    "DeviceUnavailableError",
    "EmptyMaskError",
    "InvalidImageError",
    "InvalidPriorError",
    "OutputExistsError",
    "OutputNotWritableError",
    "SpaceMismatchError",
]


def __getattr__(name: str):  # lazy: keep ``import cgc_refine`` (and ``cgc-refine --help``) light
    if name == "Refiner":
        from .refiner import Refiner

        return Refiner
    if name == "RefinerConfig":
        from .config import RefinerConfig

        return RefinerConfig
    raise AttributeError(f"module 'cgc_refine' has no attribute {name!r}")
