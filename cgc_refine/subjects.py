"""The estimator's training subjects: from what ``Refiner.fit`` is given to prepared arrays.

For each subject :class:`SubjectReader` loads the image and the brain mask (any form
:mod:`cgc_refine.io.coercion` accepts), computes or converts its prior, cleans the prior up
(:func:`cgc_refine.cleanup.clean_probability`) and preprocesses everything with
:func:`~cgc_refine.data.prepare_subject` -- or, with a
:class:`~cgc_refine.cache.SubjectCache`, takes the result from disk. Subjects are read one at
a time, so only the preprocessed, brain-cropped arrays are ever kept. No ground truth appears
in this module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ._utils import jsonable
from .cache import image_key, mask_key, prior_key
from .cleanup import CleanupSettings, clean_probability
from .data import PreparedSubject, prepare_subject
from .distributed import DistributedContext, barrier
from .exceptions import EmptyMaskError, InvalidImageError, InvalidPriorError, SpaceMismatchError
from .io.coercion import as_brain_mask, as_volume
from .priors import ProbabilityMap, as_probability_map, check_prior_informative

__all__ = ["SubjectReader", "builtin_prior", "per_volume_priors", "prior_problem", "check_priors"]

logger = logging.getLogger(__name__)


def builtin_prior(prior: Any, modality: str) -> Any | None:
    """The prior object that computes every subject's prior, or None for per-subject priors.

    Parameters
    ----------
    prior : str, prior object, or sequence
        The estimator's ``prior``: a built-in prior's name, an object with
        ``compute(volume, brain_mask)``, or one prior per volume.
    modality : {"mri", "ct"}
        Passed to a built-in prior made from its name.

    Raises
    ------
    InvalidPriorError
        If ``prior`` names no built-in prior.
    """
    if isinstance(prior, str):
        from .priors import BUILTIN_PRIORS, make_prior

        if prior in BUILTIN_PRIORS:
            return make_prior(prior, modality=modality)
        raise InvalidPriorError(
            f"unknown built-in prior {prior!r}; use one of {', '.join(BUILTIN_PRIORS)}, "
            "a prior object, or one prior map per volume"
        )
    if hasattr(prior, "compute"):
        return prior
    return None


def per_volume_priors(prior: Any, builtin: Any, n_volumes: int) -> list[Any]:
    """One external prior per volume (None each when a built-in prior computes them).

    Raises
    ------
    InvalidPriorError
        If the number of priors is not the number of volumes.
    """
    if builtin is not None:
        return [None] * n_volumes
    external = list(prior) if isinstance(prior, (list, tuple)) else [prior]
    if len(external) != n_volumes:
        raise InvalidPriorError(
            f"got {len(external)} prior map(s) for {n_volumes} volume(s); pass one prior per volume"
        )
    return external


def prior_problem(subject: PreparedSubject) -> str | None:
    """Why the subject's prior cannot teach anything (empty or full in the brain), or None."""
    try:
        check_prior_informative(ProbabilityMap(np.asarray(subject.prior[0])),  # type: ignore[index]
                                np.asarray(subject.brain[0], dtype=bool))
    except InvalidPriorError as error:
        return str(error)
    return None


def check_priors(subjects: Sequence[PreparedSubject], context: DistributedContext) -> None:
    """Refuse a cohort whose priors cannot teach anything; warn about single subjects' priors.

    Raises
    ------
    InvalidPriorError
        If the only subject's prior, or every subject's, is empty or full in the brain.
    """
    problems = [s.info.get("prior_problem") for s in subjects]
    for index, problem in enumerate(problems):
        if problem and len(subjects) == 1:
            raise InvalidPriorError(problem)
        if problem and context.is_main:
            logger.warning("subject %d: %s", index, problem)
    if all(problems):
        raise InvalidPriorError("no subject has an informative prior (all empty or full); nothing to learn")


def _check_image(volume: Any, index: int) -> None:
    """Refuse an image with a constant channel (nothing to segment)."""
    for channel, data in enumerate(volume.data):
        if float(data.min()) == float(data.max()):
            where = volume.paths[channel] if volume.paths else f"channel {channel}"
            raise InvalidImageError(
                f"subject {index}: image {where} is constant: it holds no contrast to "
                "segment; check that the right file was passed"
            )


@dataclass
class SubjectReader:
    """Reads, and prepares for training, one subject after the other.

    Parameters
    ----------
    builtin : prior object or None
        Computes every subject's prior (:func:`builtin_prior`); None when each subject
        brings its own.
    modality : {"mri", "ct"}
        Intensity handling.
    prior_kind : str
        Kind of external priors (see :func:`~cgc_refine.priors.as_probability_map`).
    random_state : int
        Subject ``index`` subsamples its foreground with seed ``random_state + index``.
    cleanup : str
        Clean-up pattern of the priors (``"none"``: none).
    """

    builtin: Any
    modality: str
    prior_kind: str
    random_state: int
    cleanup: str = "none"

    def prior_of(self, volume: Any, mask: np.ndarray | None, prior_in: Any) -> ProbabilityMap:
        """One subject's prior as a probability map on the image grid."""
        if self.builtin is not None:
            prob = self.builtin.compute(volume, mask)
        elif hasattr(prior_in, "compute"):
            prob = prior_in.compute(volume, mask)
        elif isinstance(prior_in, (str, os.PathLike)):
            prob = as_probability_map(prior_in, kind=self.prior_kind, brain_mask=mask, reference=volume)
        else:
            prob = as_probability_map(prior_in, volume.affine, kind=self.prior_kind, brain_mask=mask,
                                      spacing=volume.spacing)
        if prob.shape != tuple(volume.shape):
            raise SpaceMismatchError(
                f"prior shape {prob.shape} differs from image shape {tuple(volume.shape)}; "
                "resample the prior onto the image grid"
            )
        return prob

    def _cleaned(self, prior: ProbabilityMap, volume: Any, mask: np.ndarray | None
                 ) -> tuple[ProbabilityMap, np.ndarray | None, dict[str, Any] | None]:
        """The cleaned prior, the brain mask it used (derived when None) and what clean-up did."""
        if self.cleanup == "none":
            return prior, mask, None
        if mask is None:
            from .brain import derive_brain_mask

            mask = derive_brain_mask(volume.data[0] if self.modality == "ct" else volume.data,
                                     modality=self.modality)
        cleaned = clean_probability(prior.data, volume.spacing, CleanupSettings(pattern=self.cleanup),
                                    brain_mask=mask, affine=volume.affine)
        return type(prior)(cleaned.probability, prior.affine, prior.source, prior.params), mask, cleaned.info

    def _make(self, index: int, volume_in: Any, mask_in: Any, prior_in: Any) -> PreparedSubject:
        """Load, check, compute the prior of, clean and preprocess subject ``index``."""
        volume = as_volume(volume_in)
        _check_image(volume, index)
        mask = as_brain_mask(mask_in, volume)
        if mask is not None and not mask.any():
            raise EmptyMaskError(
                f"subject {index}: the brain mask is empty; pass this image's brain mask or "
                "None to derive one"
            )
        prior, mask, cleanup_info = self._cleaned(self.prior_of(volume, mask, prior_in), volume, mask)
        subject = prepare_subject(volume, prior, mask, self.modality, seed=self.random_state + index)
        subject.info.update(
            prior_source=prior.source, prior_params=jsonable(prior.params, strict=True),
            prior_problem=prior_problem(subject), cleanup=jsonable(cleanup_info),
            spacing=[float(v) for v in volume.spacing],
            affine=np.asarray(volume.affine, np.float64).tolist(),
        )
        return subject

    def prepare(self, index: int, volume_in: Any, mask_in: Any, prior_in: Any, cache: Any = None
                ) -> PreparedSubject:
        """Subject ``index``, prepared (through ``cache``, a :class:`~cgc_refine.cache.SubjectCache`)."""
        if cache is None:
            return self._make(index, volume_in, mask_in, prior_in)
        key = cache.key(
            image_key(volume_in), prior_key(self.builtin, prior_in), mask_key(mask_in),
            {"modality": self.modality, "seed": self.random_state + index, "prior_kind": self.prior_kind,
             "cleanup": self.cleanup},
        )
        return cache.get_or_create(key, lambda: self._make(index, volume_in, mask_in, prior_in))

    def prepare_all(self, items: Sequence[tuple[Any, Any, Any]], cache: Any, context: DistributedContext
                    ) -> list[PreparedSubject]:
        """Every subject of ``items`` (image, mask, prior), checked to share one channel count.

        Under torchrun with a cache, each rank first builds its share of the missing entries;
        then every rank reads them all.

        Raises
        ------
        InvalidImageError
            If two subjects have different numbers of channels.
        """
        if cache is not None and context.enabled:
            for index in range(context.rank, len(items), context.world_size):
                self.prepare(index, *items[index], cache)
            barrier(context)
        subjects: list[PreparedSubject] = []
        for index, item in enumerate(items):
            subject = self.prepare(index, *item, cache)
            if subjects and subject.image.shape[0] != subjects[0].image.shape[0]:
                raise InvalidImageError(
                    "all volumes must have the same number of channels, got "
                    f"{subjects[0].image.shape[0]} and {subject.image.shape[0]} (subject {index})"
                )
            subjects.append(subject)
        return subjects
