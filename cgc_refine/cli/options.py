"""Options shared by several commands, and the options built from :class:`RefinerConfig`.

Every refiner setting is described once, in :mod:`cgc_refine.config` (type, default, range,
help); :func:`config_options` turns the fields a command exposes into click options (their
help states the defaults, read from the configuration itself), and ``--config FILE`` and
``--dump-config`` (:func:`settings_file_options`) reach the rest. :func:`build_config`
combines the reduced configuration (``--fast``), the settings file and the options given.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import click

from ..config import RefinerConfig
from ..priors import ADAPTER_KINDS

__all__ = [
    "PRIOR_FILE_KINDS",
    "SINGLE_SUBJECT_SETTINGS",
    "FIT_SETTINGS",
    "build_config",
    "common_options",
    "config_options",
    "dataset_options",
    "device_options",
    "modality_option",
    "option_name",
    "report_option",
    "settings_file_options",
    "truth_option",
]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

#: How ``--prior-kind`` reads a prior file: ``auto`` (inferred from the values) or one of the
#: adapters' kinds (:data:`cgc_refine.priors.ADAPTER_KINDS`).
PRIOR_FILE_KINDS = ("auto", *ADAPTER_KINDS)

#: The RefinerConfig fields the single-subject command exposes as options; ``--config`` the rest.
SINGLE_SUBJECT_SETTINGS = ("cleanup", "rounds", "tta", "iterations", "crop_size", "threshold",
                           "min_size_mm3")
#: The same for ``fit`` (also the data-loader workers and the per-subject intensity alignment).
FIT_SETTINGS = (*SINGLE_SUBJECT_SETTINGS, "num_workers", "intensity_alignment")

_FIELDS = {spec.name: spec for spec in dataclasses.fields(RefinerConfig)}


def option_name(name: str) -> str:
    """The command-line flag of RefinerConfig field ``name`` (``--min-size-mm3``, ``--workers``)."""
    return _FIELDS[name].metadata.get("option") or "--" + name.replace("_", "-")


def _click_type(spec: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    meta = spec.metadata
    kind = meta["kind"]
    if meta.get("choices") is not None:
        return click.Choice([str(c) for c in meta["choices"]])
    if kind in ("triple", "window"):
        return click.IntRange(min=1)
    bounds = dict(min=meta.get("low"), max=meta.get("high"), min_open=meta.get("open_low", False),
                  max_open=meta.get("open_high", False))
    if kind == "int":
        return click.IntRange(min=bounds["min"], max=bounds["max"])
    if kind == "float":
        return click.FloatRange(**bounds)
    return None


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def _help(spec: dataclasses.Field, default_text: str | None = None) -> str:  # type: ignore[type-arg]
    """The field's help with its defaults, read from the configuration (never restated)."""
    if default_text is not None:
        return f"{spec.metadata['help']} ({default_text})"
    full = getattr(RefinerConfig(), spec.name)
    fast = getattr(RefinerConfig.fast(), spec.name)
    default = f"default {_shown(full)}"
    if fast != full:
        default += f"; with --fast {_shown(fast)}"
    return f"{spec.metadata['help']} ({default})"


def config_options(names: Sequence[str], *, default_text: str | None = None) -> Decorator:
    """Click options for the RefinerConfig fields ``names``, named by :func:`option_name`.

    Every option defaults to None (not given), so that ``--fast`` and ``--config`` (or a saved
    model) supply the value unless the option is given; the parameter is the field's name. The
    help states the defaults of :class:`RefinerConfig`, or ``default_text`` when given.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            spec = _FIELDS[name]
            kind = spec.metadata["kind"]
            func = click.option(
                option_name(name), name, type=_click_type(spec), default=None,
                nargs=3 if kind in ("triple", "window") else 1,
                hidden=bool(spec.metadata.get("hidden")), help=_help(spec, default_text),
                metavar="X Y Z" if kind in ("triple", "window") else None,
            )(func)
        return func

    return decorate


def settings_file_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--config FILE`` and ``--dump-config``: every other RefinerConfig setting."""
    func = click.option(
        "--dump-config", is_flag=True,
        help="Print the settings this command would use (--fast, --config and the options "
             "applied) as JSON, and exit; edit them and pass them back with --config.")(func)
    return click.option(
        "--config", "config_file", default=None, metavar="FILE",
        help="JSON file of refiner settings (any of: " + ", ".join(_FIELDS) + "); the options "
             "given on the command line take precedence.")(func)


def build_config(*, fast: bool, config_file: str | None, values: dict[str, Any]) -> RefinerConfig:
    """The configuration of a command: ``--fast`` or the paper's, then ``--config``, then options.

    Parameters
    ----------
    fast : bool
        Start from :meth:`RefinerConfig.fast` rather than the paper's settings.
    config_file : str, optional
        JSON file of settings (:meth:`RefinerConfig.from_json`).
    values : dict
        Command-line values by field name; None means not given.

    Raises
    ------
    ConfigError
        For an unreadable settings file or a value out of range.
    """
    base = RefinerConfig.fast() if fast else RefinerConfig()
    if config_file is not None:
        base = RefinerConfig.from_json(config_file, base=base)
    given = {}
    for name, value in values.items():
        if value is None or (isinstance(value, tuple) and not value):
            continue
        kind = _FIELDS[name].metadata["kind"]
        if kind in ("triple", "window"):
            value = tuple(int(v) for v in value)
        elif _FIELDS[name].metadata.get("choices") is not None and kind == "int":
            value = int(value)
        given[name] = value
    return base.replace(given)


def dump_config(config: RefinerConfig) -> str:
    """The settings as the JSON that ``--config`` reads."""
    return json.dumps(config.to_dict(), indent=2)


def common_options(*, output_help: str) -> Decorator:
    """-o, --overwrite, -q, -v: the same meaning on every command."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option("-v", "--verbose", count=True,
                            help="More messages (-v: progress information, -vv: debugging).")(func)
        func = click.option("-q", "--quiet", is_flag=True,
                            help="Only errors; no progress bar, no result lines.")(func)
        func = click.option("--overwrite", is_flag=True, help="Replace existing output files.")(func)
        return click.option("-o", "--output", type=str, default=None, metavar="PATH",
                            help=output_help)(func)

    return decorate


def device_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--device and --threads."""
    func = click.option(
        "--threads", type=click.IntRange(min=1), default=None, metavar="N",
        help="CPU threads of torch (default: OMP_NUM_THREADS if set, else the cores this "
             "process may use: affinity and cgroup quota). Results are bit-identical for one "
             "seed and one thread count, not across thread counts; recorded in the sidecar.",
    )(func)
    return click.option(
        "--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
        help="Compute device; an explicitly requested CUDA device that is absent is an error.",
    )(func)


def training_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--fast and --seed, then --device/--threads."""
    func = click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
                        help="Random seed, 0 to 2**32-1 (weights, crops, flips).")(func)
    func = click.option("--fast", is_flag=True,
                        help="Reduced network and crops that train in minutes on a CPU.")(func)
    return device_options(func)


def postprocess_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--threshold and --min-size-mm3 of ``predict``: by default the saved model's."""
    return config_options(("threshold", "min_size_mm3"), default_text="default: the model's setting")(func)


def modality_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--modality", type=click.Choice(["mri", "ct"]), default="mri",
                        show_default=True,
                        help="mri: skull-stripped MRI (FLAIR first); ct: head CT in HU.")(func)


def prior_kind_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--prior-kind", type=click.Choice(PRIOR_FILE_KINDS), default="auto",
                        show_default=True,
                        help="How to read a prior file (auto infers it from the values).")(func)


def report_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--report", is_flag=True,
        help="Also write <mask stem>_report.png (slices with prior/refined/truth contours) and "
             "<mask stem>_report.html next to the mask; needs matplotlib "
             '(pip install "cgc_refine[report]").',
    )(func)


def truth_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--truth", default=None, metavar="MASK",
        help="Ground-truth lesion mask on the image grid (values > 0): Dice, sensitivity, "
             "precision and HD95 go to the sidecar and, with --report, its contour to the report.",
    )(func)


def run_options(ctx: click.Context, options: dict[str, Any], *, modality: str | None = None) -> Any:
    """:class:`cgc_refine.workflow.RunOptions` from a command's parsed options."""
    from ..workflow import RunOptions
    from .console import STATE

    return RunOptions(
        seed=int(options.get("seed", 0)), device=options.get("device", "auto"),
        threads=options.get("threads"),
        overwrite=bool(options.get("overwrite")) or bool((ctx.obj or {}).get("overwrite")),
        modality=modality or options.get("modality", "mri"),
        command_line=("cgc-refine", *STATE.get("argv", [])),
    )


def _entity_filters(ctx: click.Context, param: click.Parameter,
                    values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--bids-filter acq-3D`` as ``("acq", "3D")``; a usage error for other forms."""
    pairs = []
    for value in values:
        key, sep, label = value.partition("-")
        if not sep or not key.isalnum() or not label.isalnum():
            raise click.BadParameter(
                f"{value!r} is not a BIDS entity: write it as in the file names, KEY-LABEL "
                "(e.g. acq-3D or ses-01)", ctx=ctx, param=param)
        pairs.append((key, label))
    return tuple(pairs)


def dataset_options(*, priors: bool) -> Decorator:
    """The options of a run over a folder or a BIDS dataset (:mod:`cgc_refine.cli.dataset`).

    Every option defaults to None, False or nothing, so that a command given none of them
    behaves as before; ``priors`` adds ``--prior-dir`` and ``--prior-pattern`` (for commands
    that read a prior).
    """
    bids = "Folders/BIDS: with --bids, "
    specs: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--bids", "bids"), dict(metavar="DATASET", help=(
            "Folders/BIDS: process every subject (and session) of this BIDS dataset: each "
            "sub-*/[ses-*/]anat/*_<suffix>.nii[.gz] image; outputs go to "
            "DATASET/derivatives/cgc_refine/ (BIDS derivatives, with dataset_description.json)."))),
        (("--bids-suffix", "bids_suffix"), dict(metavar="SUFFIX", help=(
            bids + "the suffix of the lesion-bright image (default FLAIR; e.g. T2w)."))),
        (("--bids-filter", "bids_filters"), dict(metavar="KEY-LABEL", multiple=True,
                                                 callback=_entity_filters, help=(
            bids + "only images with this entity (e.g. acq-3D, ses-01); repeat for several."))),
        (("--participant", "participants"), dict(metavar="LABEL", multiple=True, help=(
            bids + "only this participant (01 or sub-01); repeat for several (default: all)."))),
        (("--image-suffix", "image_suffix"), dict(metavar="SUFFIX", help=(
            "Folders/BIDS: with --image FOLDER, the end of the lesion-bright image's file name "
            "before .nii[.gz] (e.g. _flair); default: every image file is one subject."))),
        (("--extra-suffix", "extra_suffixes"), dict(metavar="SUFFIX", multiple=True, help=(
            "Folders/BIDS: a further modality of each subject, found beside its image by this "
            "suffix (a BIDS suffix such as T1w with --bids, a file-name end such as _t1 in a "
            "folder); repeat, in channel order."))),
    ]
    if priors:
        specs += [
            (("--prior-dir", "prior_dir"), dict(metavar="DIR", help=(
                bids + "a derivatives folder (sub-*/[ses-*/]anat) holding each image's prior "
                "map, matched by entities; omit --prior to refine these (in a folder, each "
                "subject's <id>_prior.nii.gz is found without this option)."))),
            (("--prior-pattern", "prior_pattern"), dict(metavar="GLOB", help=(
                bids + "the file pattern of the priors in --prior-dir (default *_probseg.nii*)."))),
        ]
    specs += [
        (("--brain-mask-dir", "brain_mask_dir"), dict(metavar="DIR", help=(
            bids + "a derivatives folder holding each image's brain mask (in a folder, each "
            "subject's <id>_brainmask.nii.gz is found without this option)."))),
        (("--mask-pattern", "mask_pattern"), dict(metavar="GLOB", help=(
            bids + "the file pattern of the brain masks in --brain-mask-dir (default *_mask.nii*)."))),
        (("--output-dir", "output_dir"), dict(metavar="DIR", help=(
            "Folders/BIDS: where the outputs go (created if missing); default: beside each "
            "image for a folder, DATASET/derivatives/cgc_refine/ for --bids."))),
        (("--keep-going", "keep_going"), dict(is_flag=True, help=(
            "Folders/BIDS: record a failing subject and go on (and skip BIDS subjects without "
            "the image); the exit code is then non-zero when any subject failed."))),
        (("--skip-existing", "skip_existing"), dict(is_flag=True, help=(
            "Folders/BIDS: skip the subjects whose mask exists (to continue an interrupted run)."))),
    ]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for names, settings in reversed(specs):
            func = click.option(*names, default=None if not settings.get("is_flag") else False,
                                **settings)(func)
        return func

    return decorate
