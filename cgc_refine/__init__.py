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
