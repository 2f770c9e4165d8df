"""The cgc_refine error family.

Every error the library raises on purpose derives from :class:`CGCRefineError` and also from
the built-in exception a caller would expect (``ValueError`` for bad input, ``RuntimeError``
for a failure of the environment), in the manner of scikit-learn's ``NotFittedError``. Each
message says what is wrong and what to do about it; the command line turns these errors into
one line on standard error and exit code 2. Every error class of the package is defined here
(and re-exported where it used to live, e.g. :class:`MissingDependencyError` from
:mod:`cgc_refine.report`).
"""

from __future__ import annotations

__all__ = [
    "CGCRefineError",
    "CleanupError",
    "ConfigError",
    "DatasetError",
    "InvalidGeometryError",
    "InvalidParameterError",
    "MissingDependencyError",
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


class DatasetError(CGCRefineError, ValueError):
    """A folder or BIDS dataset cannot be processed as a whole: missing or empty, no subject
    found, subject ids that collide, files whose role cannot be told, two subjects writing one
    output (raised by :mod:`cgc_refine.datasets`)."""


class InvalidParameterError(CGCRefineError, ValueError):
    """An argument of a model, loss, prior or inference function is out of range or of the
    wrong type (a window size, a loss weight, a network width...)."""


class InvalidGeometryError(CGCRefineError, ValueError):
    """A spacing, stride or factor specification of the network geometry cannot be used
    (also re-exported by :mod:`cgc_refine.model.geometry`)."""


class CleanupError(CGCRefineError, ValueError):
    """A clean-up setting is out of range (also re-exported by :mod:`cgc_refine.cleanup`)."""


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


class MissingDependencyError(CGCRefineError, ImportError):
    """An optional dependency needed for the requested feature is not installed (also
    re-exported by :mod:`cgc_refine.report`)."""
