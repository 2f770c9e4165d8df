"""The common prior format: a foreground probability map on the image grid.

Every prior source the toolkit understands -- its own GMM and Mumford-Shah priors, a binary
mask, a label map, logits, or the anomaly scores of an external detector -- ends up as one
:class:`ProbabilityMap`. The refiner only ever sees this type, so a new prior source needs
nothing but an adapter. The built-in priors share :class:`Prior`, their common base.

:class:`PriorInput` and :func:`prepare_prior_input` live in :mod:`cgc_refine.preprocessing`
(training uses them too) and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sklearn.base import BaseEstimator

from .._utils import jsonable
from ..exceptions import InvalidPriorError
from ..preprocessing import PriorInput, prepare_prior_input

__all__ = ["ProbabilityMap", "PRIOR_KINDS", "Prior", "PriorInput", "prepare_prior_input"]

#: Source kinds a :class:`ProbabilityMap` may record.
PRIOR_KINDS = (
    "probability", "mask", "labels", "logits", "scores", "gmm", "mumford-shah", "outlier",
)


@dataclass(frozen=True)
class ProbabilityMap:
    """A soft pseudo-label: per-voxel foreground (lesion) probability.

    Parameters
    ----------
    data : numpy.ndarray
        Three-dimensional float32 array with values in [0, 1], on the image's voxel grid.
    affine : numpy.ndarray or None
        The (4, 4) voxel-to-world matrix of that grid, when known.
    source : str
        Where the map came from, one of :data:`PRIOR_KINDS`.
    params : dict
        The parameters that produced it (adapter options, mixture settings, fitted values),
        JSON-serialisable, kept for provenance in sidecars and checkpoints.

    Raises
    ------
    InvalidPriorError
        If the array is not 3-D, holds NaN/Inf, or leaves [0, 1].
    """

    data: np.ndarray
    affine: np.ndarray | None = None
    source: str = "probability"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.ndim != 3:
            raise InvalidPriorError(
                f"a probability map must be 3-D, got shape {data.shape}; "
                "pass one volume per subject"
            )
        if not np.issubdtype(data.dtype, np.floating) or data.dtype != np.float32:
            data = data.astype(np.float32)
        if not np.all(np.isfinite(data)):
            raise InvalidPriorError(
                f"the probability map holds {int(np.size(data) - np.isfinite(data).sum())} "
                "NaN/Inf values; fix the prior or convert it with the matching adapter"
            )
        low, high = float(data.min()), float(data.max())
        if low < 0.0 or high > 1.0:
            raise InvalidPriorError(
                f"probability values must lie in [0, 1], found [{low:.4g}, {high:.4g}]; "
                "if these are scores or logits, say so with kind='scores' or kind='logits'"
            )
        if self.source not in PRIOR_KINDS:
            raise InvalidPriorError(
                f"unknown prior source {self.source!r}; expected one of {PRIOR_KINDS}"
            )
        affine = None if self.affine is None else np.asarray(self.affine, dtype=np.float64)
        if affine is not None and affine.shape != (4, 4):
            raise InvalidPriorError(f"affine must be 4x4, got shape {affine.shape}")
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "params", jsonable(dict(self.params)))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the map."""
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    def foreground_fraction(self, brain_mask: np.ndarray | None = None) -> float:
        """Expected foreground fraction (mean probability), optionally inside a mask."""
        values = self.data if brain_mask is None else self.data[np.asarray(brain_mask, bool)]
        return float(values.mean()) if values.size else 0.0


class Prior(BaseEstimator):
    """Common base of the built-in label-free priors (GMM, Mumford-Shah, outlier).

    Each computes, per subject, the soft pseudo-label that the network is trained against
    (the target of the paper's BCE term, equation 1; for the GMM prior the posterior of
    equation 5).

    A subclass stores its constructor arguments as given (scikit-learn style, so
    ``get_params``, ``set_params`` and ``repr`` come from :class:`sklearn.base.BaseEstimator`),
    checks them in ``_validate`` and computes the map in ``_compute``; :meth:`compute` runs
    the two and is the one public entry point, with one signature for every prior.

    Attributes
    ----------
    source : str
        The :data:`PRIOR_KINDS` entry its maps record as ``source``.
    """

    source: str = "probability"

    def compute(self, volume: Any, brain_mask: np.ndarray | None = None) -> ProbabilityMap:
        """Compute the prior for one subject.

        Parameters
        ----------
        volume : Volume or numpy.ndarray
            The subject's image(s), channel-first when several.
        brain_mask : numpy.ndarray, optional
            Boolean brain mask; derived from the image when omitted.

        Returns
        -------
        ProbabilityMap
            A foreground probability per voxel, 0 outside the brain, with ``source`` set to
            the prior's :attr:`source` and its settings and fitted values in ``params`` (see
            the subclass).

        Raises
        ------
        InvalidPriorError
            If a parameter is invalid.
        InvalidImageError, EmptyMaskError, SpaceMismatchError
            If the image or mask cannot be used.
        """
        self._validate()
        return self._compute(volume, brain_mask)

    def _validate(self) -> None:
        """Check the constructor parameters; raise :class:`InvalidPriorError` if one is bad."""

    def _compute(self, volume: Any, brain_mask: np.ndarray | None) -> ProbabilityMap:
        """The prior's map for validated parameters (implemented by each prior)."""
        raise NotImplementedError

    def _check_bright_channel(self, volume: Any) -> int:
        """``bright_channel`` as an int, checked against the channels of ``volume``."""
        bright = int(self.bright_channel)  # type: ignore[attr-defined]
        shape = np.shape(volume.data if hasattr(volume, "data") else volume)
        n_channels = int(shape[0]) if len(shape) == 4 else 1
        if bright >= n_channels:
            raise InvalidPriorError(
                f"bright_channel={bright} but the image has {n_channels} channel(s); pass the "
                "index of the channel in which lesions are bright"
            )
        return bright

    def _map(
        self, probability: np.ndarray, affine: np.ndarray | None, params: dict[str, Any]
    ) -> ProbabilityMap:
        """The result: ``probability`` clipped to [0, 1], tagged with :attr:`source`."""
        return ProbabilityMap(np.clip(probability, 0.0, 1.0), affine, self.source, params)
