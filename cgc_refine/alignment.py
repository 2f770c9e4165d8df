"""Per-subject intensity alignment: express each subject's FLAIR relative to its prior's rule.

An intensity prior draws its lesion boundary at a different standardised intensity in every
subject (the GMM's 0.5 crossing lies between 1.34 and 1.98 robust SD on the six BraTS dev
cases, issue 10), so a network trained on a cohort sees the same input value called lesion in
one subject and normal in another. Shifting each subject's prior channel so that its own
decision boundary sits at 0 gives the cohort one rule; the network then learns the shape and
the context on top of it. The boundary is found without labels, from the subject's image and
its prior alone: the intensity at which a one-feature logistic regression of the (soft)
prior on the intensity crosses 0.5.

Used by :class:`~cgc_refine.refiner.Refiner` when ``RefinerConfig.intensity_alignment ==
"prior"``: in training on every subject, and in prediction on the subject's prior, which
must then be passed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .config import INTENSITY_ALIGNMENTS
from .data import PreparedSubject

__all__ = ["INTENSITY_ALIGNMENTS", "decision_boundary", "align_subject"]

logger = logging.getLogger(__name__)


def decision_boundary(
    intensity: np.ndarray,
    prior: np.ndarray,
    brain: np.ndarray,
    *,
    max_voxels: int = 50_000,
    seed: int = 0,
) -> float | None:
    """The intensity at which the prior changes its mind, by soft-label logistic regression.

    Fits ``p(x) = sigmoid(a * x + b)`` to the prior's probabilities ``p`` at brain voxels of
    intensity ``x`` (each voxel counted as lesion with weight ``p`` and as normal with weight
    ``1 - p``, which is the maximum-likelihood fit to soft labels) and returns ``-b / a``.

    Parameters
    ----------
    intensity : numpy.ndarray
        The standardised channel the prior was computed from (FLAIR).
    prior : numpy.ndarray
        The prior's probabilities on the same grid.
    brain : numpy.ndarray
        Boolean brain mask.
    max_voxels : int
        Brain voxels used (a random subset of this size, for speed).
    seed : int
        Seed of that subset.

    Returns
    -------
    float or None
        The boundary, or None when the prior is not an increasing function of the intensity
        (``a <= 0``: a prior from another channel, or an empty one), so no shift is meaningful.
    """
    from sklearn.linear_model import LogisticRegression

    inside = np.flatnonzero(np.asarray(brain, dtype=bool).ravel())
    if inside.size == 0:
        return None
    if inside.size > max_voxels:
        inside = np.random.default_rng(seed).choice(inside, size=max_voxels, replace=False)
    x = np.asarray(intensity, dtype=np.float64).ravel()[inside]
    p = np.clip(np.asarray(prior, dtype=np.float64).ravel()[inside], 0.0, 1.0)
    if p.sum() < 1.0 or (1.0 - p).sum() < 1.0:
        return None
    features = np.concatenate([x, x])[:, None]
    labels = np.concatenate([np.ones_like(x), np.zeros_like(x)])
    weights = np.concatenate([p, 1.0 - p])
    model = LogisticRegression(C=1e4, max_iter=1000).fit(features, labels, sample_weight=weights)
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if slope <= 0.0:
        return None
    return -intercept / slope


def align_subject(subject: PreparedSubject, prior: Any, *, channel: int = 0, seed: int = 0) -> PreparedSubject:
    """The subject with ``channel`` shifted so that its prior's decision boundary is at 0.

    Parameters
    ----------
    subject : PreparedSubject
        In memory or read from a cache (then its image is loaded into memory).
    prior : tensor or array
        (1, x, y, z) prior inside the subject's box (the training target, or the subject's
        cleaned prior at prediction).
    channel : int
        The channel the prior was computed from (FLAIR, the first).
    seed : int
        Seed of the voxel subset of :func:`decision_boundary`.

    Returns
    -------
    PreparedSubject
        A new subject (the input is not modified); ``info["alignment_shift"]`` holds the
        shift, None when none was applied.
    """
    image = subject.image if isinstance(subject.image, torch.Tensor) else torch.from_numpy(
        np.asarray(subject.image[(slice(None),)]))
    brain = np.asarray(subject.brain[0].cpu() if isinstance(subject.brain, torch.Tensor) else subject.brain[0])
    prior_array = np.asarray(prior[0].cpu() if isinstance(prior, torch.Tensor) else np.asarray(prior)[0])
    intensity = image[channel].cpu().numpy()
    shift = decision_boundary(intensity, prior_array, brain, seed=seed)
    info = dict(subject.info, alignment_shift=shift)
    if shift is None:
        logger.warning("intensity alignment: the prior does not increase with channel %d; left unshifted", channel)
        return PreparedSubject(image, subject.prior, subject.brain, subject.bbox, subject.shape,
                               subject.foreground, info)
    # The whole channel moves (background included), so no edge appears at the brain's rim.
    aligned = image.clone()
    aligned[channel] -= shift
    logger.info("intensity alignment: channel %d shifted by %.3f (the prior's decision boundary)", channel, shift)
    return PreparedSubject(aligned, subject.prior, subject.brain, subject.bbox, subject.shape,
                           subject.foreground, info)
