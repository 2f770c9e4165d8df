"""Reading and checking the inputs of a job: images, brain mask, truth, prior, device.

Each reader raises an error from :mod:`cgc_refine.exceptions` that names the file and says
what to do; log lines that such an error repeats are dropped (:func:`dropping`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import RefinerConfig
from ..exceptions import EmptyMaskError, InvalidImageError, InvalidPriorError

__all__ = [
    "check_images_and_prior",
    "dropping",
    "load_brain_mask",
    "load_image",
    "load_truth",
    "make_builtin_prior",
    "refinement_facts",
    "start_run",
    "subject_prior",
    "volume_change_warning",
]

logger = logging.getLogger("cgc_refine.workflow")


class _DropMessages(logging.Filter):
    """Drop log records that an error raised right after says better."""

    def __init__(self, phrases: Sequence[str]) -> None:
        super().__init__()
        self.phrases = tuple(phrases)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(phrase in message for phrase in self.phrases)


@contextlib.contextmanager
def dropping(logger_name: str, *phrases: str) -> Iterator[None]:
    """Within the block, drop records of ``logger_name`` whose message holds one of ``phrases``."""
    target = logging.getLogger(logger_name)
    dropper = _DropMessages(phrases)
    target.addFilter(dropper)
    try:
        yield
    finally:
        target.removeFilter(dropper)


def check_images_and_prior(images: Sequence[Path], prior: Path | None) -> None:
    """Fail at once (before any warning or compute) on a missing image, and refuse an image
    passed as its own prior (the same file, or a copy with identical bytes).

    Raises
    ------
    InvalidImageError, InvalidPriorError
    """
    from ..io import check_input_file, same_file_or_content

    for image in images:
        check_input_file(image, name="image", error=InvalidImageError)
    if prior is None or not prior.is_file():
        return
    for image in images:
        if same_file_or_content(prior, image):
            raise InvalidPriorError(
                f"the prior '{prior}' is the image '{image}' itself (the same file or identical "
                "bytes); a prior is a lesion map of that image (probabilities, a mask, labels "
                "or anomaly scores): pass such a map, or a built-in prior such as --prior gmm"
            )


def start_run(device: str, threads: int | None, *,
              warn_full_on_cpu: RefinerConfig | None = None) -> tuple[Any, int]:
    """Resolve the device and set torch's CPU threads, once per job.

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    threads : int, optional
        See :func:`cgc_refine.device.configure_threads`.
    warn_full_on_cpu : RefinerConfig, optional
        Warn when this configuration trains the paper's full-size network on the CPU.

    Returns
    -------
    (torch.device, int)
        The device and the thread count in effect.
    """
    from ..device import configure_threads, resolve_device

    resolved = resolve_device(device)
    if (warn_full_on_cpu is not None and resolved.type == "cpu"
            and tuple(warn_full_on_cpu.channels) == RefinerConfig().channels):
        logger.warning(
            "training the full configuration on the CPU is slow; add --fast for a reduced "
            "network (or use a GPU with --device cuda)"
        )
    return resolved, configure_threads(threads)


def load_image(paths: Sequence[Path]) -> Any:
    """Read the image(s) as one :class:`~cgc_refine.io.Volume` and refuse a constant channel."""
    from ..io import load_volume

    with dropping("cgc_refine.io", "is constant"):  # the error below says it
        volume = load_volume([Path(p) for p in paths], name="image")
    for index, channel in enumerate(volume.data):
        low, high = float(channel.min()), float(channel.max())
        if low == high:
            raise InvalidImageError(
                f"image file '{volume.paths[index]}' is constant (every voxel is {low:g}): it "
                "holds no contrast to segment; check that the right file was passed"
            )
    return volume


def load_brain_mask(path: str | Path | None, volume: Any, modality: str) -> Any:
    """The given brain mask (checked against the image grid, not empty) or a derived one."""
    from ..brain import derive_brain_mask
    from ..io import load_mask

    if path is None:
        return derive_brain_mask(volume.data, modality=modality)  # type: ignore[arg-type]
    with dropping("cgc_refine.io", "holds no voxel above 0.5"):  # the error below says it
        mask = load_mask(Path(path), reference=volume, name="brain mask")
    if not mask.any():
        raise EmptyMaskError(
            f"brain mask file '{path}' is empty (no voxel above 0.5); pass this image's brain "
            "mask, or omit --brain-mask to derive one from the image"
        )
    return mask


def load_truth(path: str | Path, volume: Any) -> Any:
    """The ground-truth mask (every value > 0, as ``evaluate``) on the image grid."""
    from ..io import load_array

    with dropping("cgc_refine.io", "is constant", "holds no voxel"):  # an empty truth is valid
        data, _ = load_array(Path(path), reference=volume, name="truth", error=InvalidImageError)
    return data > 0


def make_builtin_prior(name: str, modality: str, device: Any) -> Any:
    """A built-in prior object (``make_prior`` drops the options a prior does not take)."""
    from ..priors import make_prior

    return make_prior(name, modality=modality, device=str(device))


def subject_prior(spec: Any, volume: Any, brain: Any, *, modality: str,
                  device: Any) -> tuple[Any, dict[str, Any]]:
    """The prior probability map of one subject and its sidecar record.

    Parameters
    ----------
    spec : PriorSpec
        Built-in name or file, and how to read the file.
    volume, brain
        The image and its brain mask.
    modality : str
        ``"mri"`` or ``"ct"``.
    device : torch.device
        For the priors that compute on a device (Mumford-Shah).

    Returns
    -------
    (ProbabilityMap, dict)
        The map and its provenance: name, how the file was read, kind, parameters,
        foreground voxels in the brain and the label-free diagnostics.

    Raises
    ------
    InvalidPriorError
        For an unreadable or uninformative prior.
    """
    from ..priors import FilePrior, check_prior_informative, prior_diagnostics, resolve_prior_name

    if spec.builtin:
        if spec.kind != "auto":
            logger.warning("--prior-kind %s is ignored for the built-in prior %s", spec.kind, spec.source)
        pmap = make_builtin_prior(spec.source, modality, device).compute(volume, brain)
        record: dict[str, Any] = {"name": spec.source,
                                  "resolved_name": resolve_prior_name(spec.source, modality),
                                  "kind_requested": None, "resampled": False}
    else:
        pmap = FilePrior(spec.path, kind=spec.kind, resample=spec.resample,
                         on_image_grid=spec.on_image_grid).compute(volume, brain)
        record = {"name": "file", **pmap.params["file"]}
    check_prior_informative(pmap, brain)
    record.update(kind=pmap.source, params=pmap.params,
                  foreground_voxels=int((pmap.data[brain] >= 0.5).sum()),
                  diagnostics=prior_diagnostics(pmap, brain, volume.spacing))
    return pmap, record


def refinement_facts(refiner: Any, config: RefinerConfig, prior: Any, probability: Any,
                     mask: Any) -> dict[str, Any]:
    """Label-free facts of a refinement for the sidecar: clean-up, rounds, TTA, change vs the prior."""
    prior_mask = prior >= 0.5
    refined = mask != 0
    total = int(prior_mask.sum()) + int(refined.sum())
    training_cleanup = (getattr(refiner, "target_cleanup_", None) or [None])[0]
    network = getattr(refiner, "network_probability_", probability)
    return {
        "recipe": {name: getattr(config, name) for name in (
            "cleanup", "cleanup_output", "target_weighting", "intensity_augmentation", "rounds",
            "ema_horizon", "tta", "anisotropic", "output_blend", "intensity_alignment", "fallback")},
        "strides": getattr(refiner, "strides_", None),
        "prior_cleanup": training_cleanup,
        "output_cleanup": getattr(refiner, "cleanup_info_", None),
        "rounds": getattr(refiner, "rounds_", []),
        "tta_agreement": getattr(refiner, "tta_agreement_", None),
        "voxels_changed_vs_prior": int((prior_mask != refined).sum()),
        "dice_with_prior": 1.0 if total == 0 else 2.0 * int((prior_mask & refined).sum()) / total,
        "network_voxels": int((network >= config.threshold).sum()),
        "blended_voxels_before_cleanup": int((probability >= config.threshold).sum()),
    }


def volume_change_warning(prior_voxels: int, refined_voxels: int) -> str | None:
    """A label-free warning when the refined mask is under half or over twice the prior's size.

    Refinement smooths and completes a prior; it should not remove or add most of it. A large
    change is worth a look: in the reduced configuration, refining a strong external
    segmentation of small lesions lost much of it (benchmarks/RESULTS.md, section 7).
    """
    from ..refiner import collapse_warning

    if collapse_warning(prior_voxels, refined_voxels, factor=2.0) is None:
        return None
    ratio = refined_voxels / prior_voxels
    return (f"the refined mask holds {refined_voxels} lesion voxels, {100 * ratio:.0f}% of the prior's "
            f"{prior_voxels}; check it against the image (a strong prior, such as another network's "
            "segmentation, can be better than its refinement)")
