"""Training and inference settings of the refiner, as one frozen dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .exceptions import ConfigError

__all__ = ["RefinerConfig", "ConfigError", "LESION_PATTERNS"]

#: Lesion patterns of the label-free clean-up (:mod:`cgc_refine.cleanup`); ``"none"`` is off.
LESION_PATTERNS = ("auto", "focal", "multifocal", "none")

#: Per-voxel weightings of the BCE term (:func:`cgc_refine.training.target_weights`).
TARGET_WEIGHTINGS = ("none", "confidence")


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    try:
        triple = tuple(int(v) for v in value)
    except TypeError:
        raise ConfigError(f"{name} must be three integers, got {value!r}") from None
    if len(triple) != 3 or min(triple) < 1:
        raise ConfigError(f"{name} must be three positive integers, got {value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class RefinerConfig:
    """Settings of the CGC refiner (defaults follow the paper, section 4.3).

    Attributes
    ----------
    channels : tuple of int
        U-Net widths per level; ``len(channels) - 1`` down-samplings (3 by default, so a
        192x192x64 crop has a 24x24x8 bottleneck).
    norm : str
        Normalisation layer: ``"batch"`` (default), ``"instance"`` or ``"group"``. Batch
        normalisation keeps the absolute intensity level of a crop, which is the lesion
        signal on FLAIR (instance normalisation removes it per crop), and at inference uses
        the same running statistics in every sliding window. Disclosure: the default was
        switched from ``"instance"`` after a reduced CPU run on one BraTS case
        (brats_2013_pat0001_1, 200 iterations) gave Dice 0.859 with batch and 0.729 with
        instance normalisation (prior 0.849); the label-free training loss agreed
        (BCE against the prior 0.195 vs 0.245). See benchmarks/RESULTS.md.
    use_coarse, use_fine : bool
        The two CGC paths (switch off for the ablations; both off = backbone + prior).
    patch_size : tuple of int
        Mini-patch size at the bottleneck for the fine path (paper: 6x6x4).
    proj_dim : int
        Embedding size of the fine path's projection head.
    temperature : float
        Contrastive temperature tau of equation 6 (paper: 0.2).
    lambda_cg, lambda_fg : float
        Weights of the coarse and fine losses in equation 8 (paper: 1, 1).
    crop_size : tuple of int
        Training crop (paper: 192x192x64); clipped to each volume and rounded down to a
        multiple of ``2 ** (len(channels) - 1)``.
    batch_size : int
        Crops per step (paper: 2).
    learning_rate : float
        Adam learning rate (paper: 1e-4).
    iterations : int
        Optimiser steps.
    foreground_oversampling : float
        Probability that a crop is centred on a voxel where the *prior* is >= 0.5 (otherwise
        the centre is uniform in the brain); no ground truth is involved.
    inference_window : tuple of int or None
        Sliding-window size at inference (None: the training crop). The network is fully
        convolutional, so a larger window than the crop cuts the number of windows.
    overlap : float
        Sliding-window overlap at inference.
    sw_batch_size : int
        Windows per inference batch.
    threshold : float
        Probability threshold of the refined mask.
    min_size_mm3 : float
        Remove connected components smaller than this (0: keep all).
    amp : bool
        bf16 autocast on CUDA (ignored on CPU).
    compile : bool
        ``torch.compile`` the network for training (CUDA).
    num_workers : int
        Data-loader worker processes drawing training crops while the step runs (0: in the
        training process, the reproducible default). Workers are used when the subjects stay
        on the CPU side -- read from the on-disk cache, or too large (> 4 GiB) to be moved to
        the GPU -- and pay off when the step runs on a GPU; subjects already on the GPU are
        cropped there and workers are not started. On a CPU-only machine they compete with
        the step for the cores (benchmarks/RESULTS.md, section 10). Each worker has its own
        generator, so a resumed run continues with fresh crops rather than the exact stream.
    log_every : int
        Iterations between progress log lines.

    The label-free refinement recipe (issue "refinement that refines"; each part can be
    switched off for the ablation table in benchmarks/RESULTS.md):

    target_weighting : {"confidence", "none"}
        Per-voxel BCE weights from the pseudo-label's margin, ``|2p - 1|``
        (:func:`cgc_refine.training.target_weights`).
    intensity_augmentation : bool
        Per-channel gamma, bias field, contrast/brightness, noise and blur of every training
        crop's image, never of its target (:mod:`cgc_refine.augment`).
    cleanup : {"auto", "focal", "multifocal", "none"}
        Lesion pattern of the label-free clean-up (:mod:`cgc_refine.cleanup`) applied to the
        training target of every round; ``"none"`` trains on the raw prior.
    cleanup_output : bool
        Apply the same clean-up to the refined mask (post-processing).
    rounds : int
        Self-training rounds: round 1 learns from the (cleaned) prior, round r from the
        cleaned, test-time-augmented prediction of round r - 1, each from fresh weights.
    tta : int
        Test-time augmentation: the number of flipped copies averaged at inference (1: none;
        2: left-right flip; 4: flips of the first two axes; 8: all axis flips).
    anisotropic : bool
        Choose per-axis down-sampling strides from the voxel spacing
        (:func:`cgc_refine.model.anisotropic_strides`): an axis much coarser than the finest
        is not pooled until the others catch up. False pools every axis at every level.
    output_blend : {"confidence", "none"}
        The refined probability trusts the cleaned prior where it is sure and the network
        where it is not: ``c * prior + (1 - c) * network`` with ``c = |2 prior - 1|``, the
        weights of training (:func:`cgc_refine.refiner.blend_with_prior`); used when the
        subject's prior is passed to ``predict`` (the single-subject command does). Disclosure: added
        after the dev BraTS run (GMM prior, CPU --fast) scored the network + clean-up at
        0.844 and this blend at 0.852 (benchmarks/RESULTS.md, section 11).
    fallback : bool
        Label-free guard: when the refined mask holds under a third or over three times the
        cleaned prior's volume (a collapse or an explosion, not a refinement), warn and return
        the cleaned prior instead.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    norm: str = "batch"
    use_coarse: bool = True
    use_fine: bool = True
    patch_size: tuple[int, int, int] = (6, 6, 4)
    proj_dim: int = 128
    temperature: float = 0.2
    lambda_cg: float = 1.0
    lambda_fg: float = 1.0
    crop_size: tuple[int, int, int] = (192, 192, 64)
    batch_size: int = 2
    learning_rate: float = 1e-4
    iterations: int = 2000
    foreground_oversampling: float = 0.5
    inference_window: tuple[int, int, int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 2
    threshold: float = 0.5
    min_size_mm3: float = 0.0
    amp: bool = True
    compile: bool = False
    num_workers: int = 0
    log_every: int = 50
    target_weighting: str = "confidence"
    intensity_augmentation: bool = True
    cleanup: str = "auto"
    cleanup_output: bool = True
    rounds: int = 1
    tta: int = 8
    anisotropic: bool = True
    output_blend: str = "confidence"
    fallback: bool = True

    @classmethod
    def fast(cls, **overrides: Any) -> "RefinerConfig":
        """A reduced configuration that trains in minutes on a CPU.

        Narrower network (8-16-32-64), 64x64x32 crops and 200 iterations at a higher
        learning rate (3e-3, to make up for the fewer steps), inference in 128x128x64
        windows with 25 % overlap. Mini-patches are 2x2x2 so that the 8x8x4 bottleneck keeps
        the paper's 4x4x2 grid of patches (6x6x4 of 24x24x8); the other CGC settings are the
        paper's. Test-time augmentation averages 2 copies (the left-right flip) instead of 8.
        """
        base = dict(
            channels=(8, 16, 32, 64), crop_size=(64, 64, 32), iterations=200, patch_size=(2, 2, 2),
            learning_rate=3e-3, sw_batch_size=1, log_every=20,
            inference_window=(128, 128, 64), overlap=0.25, tta=2,
        )
        base.update(overrides)
        return cls(**base)

    def validate(self) -> "RefinerConfig":
        """Check every field; return a normalised copy (tuples, ints, floats).

        Raises
        ------
        ConfigError
            With the offending field and the accepted range.
        """
        channels = tuple(int(c) for c in self.channels)
        if len(channels) < 2 or min(channels) < 1:
            raise ConfigError(f"channels must hold at least two positive widths, got {self.channels!r}")
        if self.norm not in ("instance", "group", "batch"):
            raise ConfigError(f"norm must be instance, group or batch, got {self.norm!r}")
        if not 0.0 < float(self.temperature) <= 10.0:
            raise ConfigError(f"temperature must be in (0, 10], got {self.temperature!r}")
        for name in ("lambda_cg", "lambda_fg", "min_size_mm3"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("batch_size", "iterations", "proj_dim", "sw_batch_size", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if int(self.num_workers) < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers!r}")
        if not 0.0 < float(self.learning_rate) < 1.0:
            raise ConfigError(f"learning_rate must be in (0, 1), got {self.learning_rate!r}")
        if not 0.0 <= float(self.foreground_oversampling) <= 1.0:
            raise ConfigError("foreground_oversampling must be in [0, 1]")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if self.target_weighting not in TARGET_WEIGHTINGS:
            raise ConfigError(f"target_weighting must be one of {TARGET_WEIGHTINGS}, got {self.target_weighting!r}")
        if self.output_blend not in ("confidence", "none"):
            raise ConfigError(f"output_blend must be 'confidence' or 'none', got {self.output_blend!r}")
        if self.cleanup not in LESION_PATTERNS:
            raise ConfigError(f"cleanup must be one of {LESION_PATTERNS}, got {self.cleanup!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= 10:
            raise ConfigError(f"rounds must be an integer from 1 to 10, got {self.rounds!r}")
        if self.tta not in (1, 2, 4, 8) or isinstance(self.tta, bool):
            raise ConfigError(f"tta must be 1, 2, 4 or 8 flipped copies, got {self.tta!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold!r}")
        window = None if self.inference_window is None else _triple(self.inference_window, "inference_window")
        if window is not None and any(w % (2 ** (len(channels) - 1)) for w in window):
            raise ConfigError(
                f"inference_window {window} must be a multiple of {2 ** (len(channels) - 1)} along every axis"
            )
        return dataclasses.replace(
            self,
            inference_window=window,
            channels=channels,
            patch_size=_triple(self.patch_size, "patch_size"),
            crop_size=_triple(self.crop_size, "crop_size"),
        )

    @property
    def downsample_factor(self) -> int:
        """Total down-sampling of the U-Net (``2 ** (len(channels) - 1)``)."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dictionary (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RefinerConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown refiner settings {sorted(unknown)}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**converted).validate()
