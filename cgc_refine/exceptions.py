"""The cgc_refine error family.

Every error the library raises on purpose derives from :class:`CGCRefineError` and also from
the built-in exception a caller would expect (``ValueError`` for bad input, ``RuntimeError``
for a failure of the environment), in the manner of scikit-learn's ``NotFittedError``. Each
message says what is wrong and what to do about it; the command line turns these errors into
one line on standard error and exit code 2.
"""

from __future__ import annotations

__all__ = [
    "CGCRefineError",
    "ConfigError",
    "InvalidImageError",
    "InvalidPriorError",
    "SpaceMismatchError",
    "EmptyMaskError",
    "CheckpointError",
    "DeviceUnavailableError",
    "OutputExistsError",
    "OutputNotWritableError",
]


class CGCRefineError(Exception):
    """Base class of every error raised on purpose by cgc_refine."""


class ConfigError(CGCRefineError, ValueError):
    """A refiner setting is out of range (also re-exported by :mod:`cgc_refine.config`)."""


class InvalidImageError(CGCRefineError, ValueError):
    """An image cannot be used: unreadable, wrong dimensionality, NaN/Inf, constant."""


class InvalidPriorError(CGCRefineError, ValueError):
    """A prior cannot be turned into a probability map (NaN, out of range, empty, full...)."""


class SpaceMismatchError(CGCRefineError, ValueError):
    """Two volumes that must share one voxel grid (shape and affine) do not."""


class EmptyMaskError(CGCRefineError, ValueError):
    """A brain mask (given or derived) holds no voxel."""


class CheckpointError(CGCRefineError, RuntimeError):
    """A saved model cannot be read, does not fit the data it is applied to, or cannot be
    written (disk full, file-size limit, a failing serialiser)."""


class DeviceUnavailableError(CGCRefineError, RuntimeError):
    """An explicitly requested compute device is not available on this machine."""


class OutputExistsError(CGCRefineError, FileExistsError):
    """An output file exists already and overwriting was not allowed."""


class OutputNotWritableError(CGCRefineError, PermissionError):
    """An output cannot be written (folder missing or not writable)."""
