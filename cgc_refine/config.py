"""Training and inference settings of the refiner, as one frozen dataclass."""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .exceptions import ConfigError

__all__ = ["RefinerConfig", "ConfigError", "LESION_PATTERNS", "TARGET_WEIGHTINGS", "INTENSITY_ALIGNMENTS",
           "setting"]

#: Lesion patterns of the label-free clean-up (:mod:`cgc_refine.cleanup`); ``"none"`` is off.
LESION_PATTERNS = ("auto", "focal", "multifocal", "none")

#: Per-subject intensity alignments (:mod:`cgc_refine.alignment`).
INTENSITY_ALIGNMENTS = ("none", "prior")

#: Per-voxel weightings of the BCE term (:func:`cgc_refine.training.target_weights`).
TARGET_WEIGHTINGS = ("none", "confidence")


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    try:
        triple = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be three integers, got {value!r}") from None
    if len(triple) != 3 or min(triple) < 1:
        raise ConfigError(f"{name} must be three positive integers, got {value!r}")
    return triple  # type: ignore[return-value]


def setting(
    default: Any,
    help: str,
    *,
    notes: str = "",
    kind: str | None = None,
    choices: tuple[Any, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    option: str | None = None,
    hidden: bool = False,
) -> Any:
    """Describe one :class:`RefinerConfig` field once: its default, help text and value range.

    The command line builds its options from these descriptions
    (:func:`cgc_refine.cli.options.config_options`), and the class docstring lists them, so
    neither restates a default or a range by hand.

    Parameters
    ----------
    default : object
        The default value (a tuple for a sequence).
    help : str
        One or two sentences, shown by ``--help`` and in the class docstring.
    notes : str
        Further detail for the docstring only (provenance, disclosures).
    kind : str, optional
        ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"triple"`` (three positive integers),
        ``"widths"`` (positive integers) or ``"window"`` (``"triple"`` or None); by default
        from the type of ``default``.
    choices : tuple, optional
        The accepted values.
    low, high : float, optional
        Inclusive (or, with ``open_low``/``open_high``, exclusive) bounds.
    option : str, optional
        The command-line flag when it is not ``--`` plus the field name with dashes.
    hidden : bool
        Keep the command-line option out of ``--help`` (advanced settings).

    Returns
    -------
    dataclasses.Field
    """
    if kind is None:
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(default), "triple")
    metadata = {"help": help, "notes": notes, "kind": kind, "choices": choices, "low": low,
                "high": high, "open_low": open_low, "open_high": open_high, "option": option,
                "hidden": hidden}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class RefinerConfig:
    """Settings of the CGC refiner (defaults follow the paper, section 4.3).

    Every field is described once, by :func:`setting`; the attributes below are generated
    from those descriptions. A JSON file of some or all fields is read by
    :meth:`from_json` (the command line's ``--config``), :meth:`to_dict` writes one.
    """

    channels: tuple[int, ...] = setting(
        (32, 64, 128, 256), "U-Net widths per level; len(channels) - 1 down-samplings.",
        notes="3 by default, so a 192x192x64 crop has a 24x24x8 bottleneck.", kind="widths")
    norm: str = setting(
        "batch", "Normalisation layer of the network.", choices=("batch", "instance", "group"),
        notes="Batch normalisation keeps the absolute intensity level of a crop, which is the "
              "lesion signal on FLAIR (instance normalisation removes it per crop), and at "
              "inference uses the same running statistics in every sliding window. Disclosure: "
              "the default was switched from instance after a reduced CPU run on one BraTS case "
              "(brats_2013_pat0001_1, 200 iterations) gave Dice 0.859 with batch and 0.729 with "
              "instance normalisation (prior 0.849); the label-free training loss agreed (BCE "
              "against the prior 0.195 vs 0.245). See benchmarks/RESULTS.md.")
    use_coarse: bool = setting(True, "Use the coarse CGC path (off for the ablations).")
    use_fine: bool = setting(True, "Use the fine CGC path (both paths off: backbone + prior).")
    patch_size: tuple[int, int, int] = setting(
        (6, 6, 4), "Mini-patch size at the bottleneck for the fine path (paper: 6x6x4).")
    proj_dim: int = setting(128, "Embedding size of the fine path's projection head.", low=1)
    temperature: float = setting(
        0.2, "Contrastive temperature tau of equation 6 (paper: 0.2).", low=0.0, high=10.0,
        open_low=True)
    lambda_cg: float = setting(1.0, "Weight of the coarse loss in equation 8.", low=0.0)
    lambda_fg: float = setting(1.0, "Weight of the fine loss in equation 8.", low=0.0)
    crop_size: tuple[int, int, int] = setting(
        (192, 192, 64), "Training crop size (voxels at 1 mm).", hidden=True,
        notes="Paper: 192x192x64. Clipped to each volume and rounded down to a multiple of "
              "2 ** (len(channels) - 1).")
    batch_size: int = setting(2, "Crops per training step (paper: 2).", low=1)
    learning_rate: float = setting(
        1e-4, "Adam learning rate (paper: 1e-4).", low=0.0, high=1.0, open_low=True, open_high=True)
    iterations: int = setting(2000, "Training iterations (optimiser steps).", low=1)
    foreground_oversampling: float = setting(
        0.5, "Probability that a training crop is centred on a voxel where the prior is >= 0.5.",
        low=0.0, high=1.0, notes="Otherwise the centre is uniform in the brain; no ground truth "
                                 "is involved.")
    inference_window: tuple[int, int, int] | None = setting(
        None, "Sliding-window size at inference (None: the training crop).", kind="window",
        notes="The network is fully convolutional, so a larger window than the crop cuts the "
              "number of windows. A multiple of 2 ** (len(channels) - 1) along every axis.")
    overlap: float = setting(0.5, "Sliding-window overlap at inference.", low=0.0, high=1.0,
                             open_high=True)
    sw_batch_size: int = setting(2, "Sliding windows per inference batch.", low=1)
    threshold: float = setting(0.5, "Probability threshold of the mask.", low=0.0, high=1.0,
                               open_low=True, open_high=True)
    min_size_mm3: float = setting(0.0, "Remove lesion components smaller than this (mm^3; 0: keep all).",
                                  low=0.0)
    amp: bool = setting(True, "bf16 autocast on CUDA (ignored on CPU).")
    compile: bool = setting(False, "torch.compile the network for training (CUDA).")
    num_workers: int = setting(
        0, "Data-loader worker processes drawing crops while the step runs.", low=0,
        option="--workers",
        notes="0: in the training process, the reproducible default. Workers are used when the "
              "subjects stay on the CPU side -- read from the on-disk cache, or too large "
              "(> 4 GiB) to be moved to the GPU -- and pay off when the step runs on a GPU; "
              "subjects already on the GPU are cropped there and workers are not started. On a "
              "CPU-only machine they compete with the step for the cores (benchmarks/RESULTS.md, "
              "section 10). Each worker has its own generator, so a resumed run continues with "
              "fresh crops rather than the exact stream.")
    log_every: int = setting(50, "Iterations between progress log lines.", low=1)
    target_weighting: str = setting(
        "confidence", "Per-voxel BCE weights from the pseudo-label's margin |2p - 1| (none: off).",
        choices=TARGET_WEIGHTINGS, notes="See :func:`cgc_refine.training.target_weights`.")
    intensity_augmentation: bool = setting(
        True, "Random gamma, bias field, contrast, noise and blur of every training crop's image.",
        notes="Never of its target (:mod:`cgc_refine.augment`).")
    intensity_alignment: str = setting(
        "none", "Shift each subject's FLAIR so that its prior's decision boundary is at 0 "
                "(prior), for cohorts whose priors draw the line at different intensities.",
        choices=INTENSITY_ALIGNMENTS,
        notes="The boundary is a soft-label logistic fit of the training target on the first "
              "channel (:mod:`cgc_refine.alignment`); a model trained with it needs the "
              "subject's prior at prediction. Leave-one-out on the BraTS dev cases: 0.848 "
              "without, 0.855 with (benchmarks/RESULTS.md, section 14).")
    cleanup: str = setting(
        "auto", "Label-free clean-up of the prior and of the refined mask, by lesion pattern: "
                "focal (one mass: tumour, stroke), multifocal (many foci: MS, WMH), auto "
                "(decided from the prior) or none.", choices=LESION_PATTERNS,
        notes="Applied to the training target of every round (:mod:`cgc_refine.cleanup`); "
              "none trains on the raw prior.")
    cleanup_output: bool = setting(True, "Apply the same clean-up to the refined mask.")
    rounds: int = setting(
        1, "Self-training rounds: round r learns from round r-1's cleaned prediction.", low=1,
        high=10, notes="Round 1 learns from the (cleaned) prior, round r from the cleaned, "
                       "test-time-augmented prediction of round r - 1 (blended with the cleaned "
                       "prior when ``output_blend`` is on, as the output is), each from fresh "
                       "weights.")
    ema_horizon: float = setting(
        0.1, "EMA teacher: average the weights over this fraction of the iterations (0: off).",
        low=0.0, high=1.0,
        notes="The averaged network (decay 1 - 1 / (ema_horizon * iterations); "
              ":mod:`cgc_refine.weight_average`) predicts each round's next targets and the "
              "output, in place of the last iterate. The default was fixed before any run; "
              "measured in benchmarks/RESULTS.md, section 14.")
    tta: int = setting(8, "Flipped copies averaged at inference (test-time augmentation).",
                       choices=(1, 2, 4, 8),
                       notes="1: none; 2: left-right flip; 4: flips of the first two axes; 8: all "
                             "axis flips.")
    anisotropic: bool = setting(
        True, "Choose per-axis down-sampling strides from the voxel spacing.",
        notes="An axis much coarser than the finest is not pooled until the others catch up "
              "(:func:`cgc_refine.model.anisotropic_strides`); off pools every axis at every level.")
    output_blend: str = setting(
        "confidence", "Blend the refined probability with the cleaned prior by its confidence "
                      "(none: the network alone).", choices=("confidence", "none"),
        notes="c * prior + (1 - c) * network with c = |2 prior - 1|, the weights of training "
              "(:func:`cgc_refine.refiner.blend_with_prior`); used when the subject's prior is "
              "passed to predict (the single-subject command does). Disclosure: added after the "
              "dev BraTS run (GMM prior, CPU --fast) scored the network + clean-up at 0.844 and "
              "this blend at 0.852 (benchmarks/RESULTS.md, section 11).")
    fallback: bool = setting(
        True, "Return the cleaned prior when the refined mask collapses or explodes.",
        notes="Label-free guard: a refined mask under a third or over three times the cleaned "
              "prior's volume is not a refinement; warn and return the cleaned prior instead.")

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
        for spec in dataclasses.fields(self):
            _check_value(spec, getattr(self, spec.name))
        channels = tuple(int(c) for c in self.channels)
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

    def replace(self, values: dict[str, Any]) -> "RefinerConfig":
        """A validated copy with some fields changed (lists become tuples); unknown keys are an error.

        Raises
        ------
        ConfigError
            For an unknown field name or a value out of its range.
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown refiner settings {sorted(unknown)}; the settings are {sorted(known)}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return dataclasses.replace(self, **converted).validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RefinerConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones take the default."""
        return cls().replace(values)

    @classmethod
    def from_json(cls, path: str | Path, *, base: "RefinerConfig | None" = None) -> "RefinerConfig":
        """Read settings from a JSON object (some or all fields) over ``base`` (default: defaults).

        Raises
        ------
        ConfigError
            When the file cannot be read, is not a JSON object, or holds an unknown field or a
            value out of range; the message names the file.
        """
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"cannot read settings file '{path}' ({exc.strerror or exc}); check the path") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"settings file '{path}' is not valid JSON ({exc}); write it with --dump-config") from None
        if not isinstance(values, dict):
            raise ConfigError(
                f"settings file '{path}' must hold a JSON object of settings, got {type(values).__name__}")
        try:
            return (base or cls()).replace(values)
        except ConfigError as exc:
            raise ConfigError(f"settings file '{path}': {exc}") from None


def _check_value(spec: dataclasses.Field, value: Any) -> None:  # type: ignore[type-arg]
    """Check one field's value against its :func:`setting` description."""
    meta = spec.metadata
    name, kind = spec.name, meta.get("kind")
    if kind in ("triple", "window"):
        if not (kind == "window" and value is None):
            _triple(value, name)
        return
    if kind == "widths":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{name} must hold at least two positive widths, got {value!r}")
        if len(tuple(value)) < 2 or not all(_is_int(v) and v >= 1 for v in value):
            raise ConfigError(f"{name} must hold at least two positive widths, got {value!r}")
        return
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind == "int" and not _is_int(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    below = low is not None and (value <= low if meta.get("open_low") else value < low)
    above = high is not None and (value >= high if meta.get("open_high") else value > high)
    if below or above:
        raise ConfigError(f"{name} must be {describe_range(spec)}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def describe_range(spec: dataclasses.Field) -> str:  # type: ignore[type-arg]
    """A field's accepted range as text: ``in [0, 1)``, ``>= 1``, ``in (0, 10]``."""
    meta = spec.metadata
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return f"in {'(' if meta['open_low'] else '['}{low:g}, {high:g}{')' if meta['open_high'] else ']'}"
    if low is not None:
        return f"{'>' if meta['open_low'] else '>='} {low:g}"
    if high is not None:
        return f"{'<' if meta['open_high'] else '<='} {high:g}"
    return "any value"


def _attributes_section() -> str:
    """The numpydoc ``Attributes`` section of :class:`RefinerConfig`, from the field descriptions."""
    lines = ["", "    Attributes", "    ----------"]
    for spec in dataclasses.fields(RefinerConfig):
        meta = spec.metadata
        lines.append(f"    {spec.name} : {spec.type}")
        text = f"{meta['help']} Default: {spec.default!r}."
        if meta.get("notes"):
            text += " " + meta["notes"]
        lines.append("        " + text)
    return "\n".join(lines) + "\n"


RefinerConfig.__doc__ = (RefinerConfig.__doc__ or "") + _attributes_section()
