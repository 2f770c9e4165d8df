"""Label-free steps around the trained network: TTA, self-training targets, blending, guard.

- :func:`predict_box`: the network's probability inside a subject's brain box, averaged over
  the axis flips of :func:`tta_flips`, with how well the flipped copies agree;
- :func:`next_targets`: a self-training round's targets, each subject's cleaned, TTA-averaged
  prediction (blended with the cleaned prior, as the output is);
- :func:`blend_with_prior`: trust the cleaned prior where it is sure, the network where not;
- :func:`collapse_warning`: the collapse guard's test on the refined volume.

:class:`~cgc_refine.refiner.Refiner` uses all of them; none needs ground truth.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .cleanup import CleanupSettings, clean_probability
from .config import RefinerConfig
from .data import PreparedSubject, with_target
from .inference import sliding_window_predict

__all__ = ["tta_flips", "predict_box", "next_targets", "blend_with_prior", "collapse_warning", "as_numpy"]

logger = logging.getLogger(__name__)


def as_numpy(array: Any) -> np.ndarray:
    """A tensor (on any device) or an on-disk array as a NumPy array."""
    return array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays (1.0 when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def tta_flips(copies: int) -> list[tuple[int, ...]]:
    """The axis flips of ``copies`` test-time-augmented passes (1, 2, 4 or 8).

    2 adds the flip of the first axis (left-right in RAS/LPS scans, the brain's mirror
    axis), 4 the flips of the first two axes, 8 every combination of the three.
    """
    axes = {1: (), 2: (0,), 4: (0, 1), 8: (0, 1, 2)}[int(copies)]
    sets: list[tuple[int, ...]] = [()]
    for axis in axes:
        sets += [flips + (axis,) for flips in sets]
    return sets


def predict_box(
    network: torch.nn.Module,
    subject: PreparedSubject,
    config: RefinerConfig,
    window: Sequence[int],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, float]:
    """TTA-averaged probability inside the subject's box, and the agreement of the copies.

    Parameters
    ----------
    network : CGCUNet
        The trained network (put in eval mode here).
    subject : PreparedSubject
        In memory or on disk.
    config : RefinerConfig
        ``tta`` copies, ``threshold``, ``overlap``, ``sw_batch_size`` and ``amp``.
    window : sequence of 3 int
        Sliding-window size.
    device : torch.device
        Where the windows run (the result is gathered on the CPU).
    progress : callable, optional
        ``progress(done, total)`` over the windows of each copy.

    Returns
    -------
    probability : numpy.ndarray
        float32, 0 outside the brain.
    agreement : float
        Mean Dice between each flipped copy's mask and the averaged mask (1: every copy says
        the same; a label-free measure of how stable the output is).
    """
    network.eval()
    image = subject.image if isinstance(subject.image, torch.Tensor) else torch.from_numpy(
        np.asarray(subject.image[(slice(None),)]))
    inputs = image[None].to(device).contiguous(memory_format=torch.channels_last_3d)
    autocast = torch.bfloat16 if (device.type == "cuda" and config.amp) else None
    flip_sets = tta_flips(getattr(config, "tta", 1))
    total, copies = None, []
    for flips in flip_sets:
        dims = [axis + 2 for axis in flips]
        flipped = inputs.flip(dims) if dims else inputs
        logits = sliding_window_predict(
            flipped, network, window, overlap=config.overlap,
            sw_batch_size=config.sw_batch_size, mode="gaussian",
            sw_device=device, device=torch.device("cpu"), progress=progress,
            autocast_dtype=autocast,
        )
        prob = torch.sigmoid(logits.float())
        prob = (prob.flip(dims) if dims else prob)[0, 0].numpy()
        copies.append(prob >= config.threshold)
        total = prob if total is None else total + prob
    brain = as_numpy(subject.brain[0])
    mean = np.where(brain, total / len(flip_sets), 0.0).astype(np.float32)
    averaged = mean >= config.threshold
    agreement = float(np.mean([_dice(c & brain, averaged) for c in copies]))
    return mean, agreement


def next_targets(
    network: torch.nn.Module,
    subjects: Sequence[PreparedSubject],
    config: RefinerConfig,
    round_index: int,
    *,
    window: Sequence[int],
    device: torch.device,
    random_state: int,
    blend_references: Sequence[Any] | None = None,
) -> tuple[list[PreparedSubject], dict[str, Any]]:
    """Round ``round_index``'s targets: each subject's cleaned, TTA-averaged prediction.

    Parameters
    ----------
    network : CGCUNet
        The previous round's network.
    subjects : sequence of PreparedSubject
        The previous round's training subjects.
    config : RefinerConfig
        Prediction settings (see :func:`predict_box`) and the clean-up pattern.
    round_index : int
        The round the targets are for (2 for the first self-training round).
    window : sequence of 3 int
        Sliding-window size.
    device : torch.device
        Where prediction runs.
    random_state : int
        Subject ``index``'s foreground is subsampled with seed ``random_state + index``.
    blend_references : sequence of tensors, optional
        The first round's targets (the cleaned priors). With ``config.output_blend ==
        "confidence"`` each prediction is blended with its reference (:func:`blend_with_prior`)
        before the clean-up, so that a round learns from what the refiner would output after
        the previous round, not from the bare network.

    Returns
    -------
    subjects : list of PreparedSubject
        The same subjects with the new targets.
    record : dict
        Per subject: voxels changed, Dice with the previous target and TTA agreement.
    """
    updated, changed, agreement, consistency = [], [], [], []
    for index, subject in enumerate(subjects):
        probability, copies_agreement = predict_box(network, subject, config, window, device)
        previous = as_numpy(subject.prior[0]) >= 0.5
        if blend_references is not None and getattr(config, "output_blend", "none") == "confidence":
            probability = blend_with_prior(probability, as_numpy(blend_references[index][0]))
        if config.cleanup != "none":
            cleaned = clean_probability(
                probability, subject.info.get("spacing", (1.0, 1.0, 1.0)),
                CleanupSettings(pattern=config.cleanup),
                brain_mask=as_numpy(subject.brain[0]),
                affine=subject.info.get("affine"),
            ).probability
        else:
            cleaned = probability
        new = cleaned >= 0.5
        changed.append(int((new != previous).sum()))
        agreement.append(_dice(new, previous))
        consistency.append(copies_agreement)
        target = torch.from_numpy(np.ascontiguousarray(cleaned, dtype=np.float32))[None]
        if isinstance(subject.image, torch.Tensor):
            target = target.to(subject.image.device)
        updated.append(with_target(subject, target, seed=random_state + index))
    record = {"round": round_index, "voxels_changed": changed, "dice_with_previous_target": agreement,
              "tta_agreement": consistency}
    logger.info("round %d targets: %s voxels changed, Dice with the previous target %s, TTA agreement %s",
                round_index, changed, [round(a, 3) for a in agreement], [round(c, 3) for c in consistency])
    return updated, record


def collapse_warning(prior_voxels: int, refined_voxels: int, factor: float = 3.0) -> str | None:
    """A warning when the refined volume is under ``1/factor`` or over ``factor`` times the prior's."""
    if prior_voxels == 0:
        return None
    ratio = refined_voxels / prior_voxels
    if ratio < 1.0 / factor or ratio > factor:
        return (f"the refined mask holds {refined_voxels} voxels, {ratio:.2f} times the prior's {prior_voxels}: "
                "training did not refine this prior")
    return None


def blend_with_prior(network: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Trust the (cleaned) prior where it is sure, the network where it is not.

    ``p = c * prior + (1 - c) * network`` with ``c = |2 prior - 1|``, the same confidence that
    weights the BCE term in training (:func:`cgc_refine.training.target_weights`): the network
    learned from the voxels the prior was sure of, and decides the ones it was not. A hard
    (0/1) prior is returned unchanged -- it states no uncertainty for the network to resolve;
    soften it first (``from_mask(sigma_mm=...)``) to let the network move its boundary.
    """
    confidence = np.abs(2.0 * prior - 1.0)
    return np.clip(confidence * prior + (1.0 - confidence) * network, 0.0, 1.0).astype(np.float32)
