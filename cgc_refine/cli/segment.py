"""The group itself: ``cgc-refine --prior PRIOR --image IMG`` refines one subject."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from .._version import __version__
from ..priors import BUILTIN_PRIORS
from .app import CLIGroup
from . import dataset
from .console import PROG, ConsoleProgress, configure_logging, say, summary_line, wrote
from .options import (
    SINGLE_SUBJECT_SETTINGS,
    build_config,
    common_options,
    config_options,
    dataset_options,
    dump_config,
    modality_option,
    prior_kind_option,
    report_option,
    run_options,
    settings_file_options,
    training_options,
    truth_option,
)
from .outputs import resolve_output

__all__ = ["main"]

logger = logging.getLogger("cgc_refine.cli")

_SHARED = ("quiet", "verbose", "overwrite")


@click.group(
    cls=CLIGroup,
    name=PROG,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name=PROG, message="%(prog)s %(version)s")
@click.option("--prior", "prior", metavar="PRIOR",
              help="A prior map (.nii/.nii.gz) or a built-in prior: " + ", ".join(BUILTIN_PRIORS)
                   + " (auto: the default prior).")
@click.option("--image", "images", multiple=True, metavar="IMG",
              help="Image file; repeat for several modalities, the lesion-bright one (FLAIR/CT) "
                   "first. Or a folder: every subject in it (<id>.nii.gz files, or one "
                   "sub-folder per subject).")
@click.option("--brain-mask", default=None, metavar="MASK",
              help="Brain mask on the image grid (default: derived from the image).")
@prior_kind_option
@modality_option
@click.option("--resample-prior", is_flag=True,
              help="Resample a prior on another grid onto the image grid (linear; nearest for "
                   "masks and labels).")
@click.option("--prior-on-image-grid", is_flag=True,
              help="Take a prior file with the image's shape but another affine (a lost header) "
                   "as being on the image's voxel grid, ignoring its affine.")
@click.option("--save-proba", is_flag=True,
              help="Also write the refined probability map (<stem>_label-lesion_probseg.nii.gz).")
@click.option("--save-model", default=None, metavar="PATH", help="Also save the trained model.")
@truth_option
@report_option
@dataset_options(priors=True)
@config_options(SINGLE_SUBJECT_SETTINGS)
@settings_file_options
@training_options
@common_options(output_help="Output mask file (.nii.gz) or folder (default: next to the image).")
@click.pass_context
def main(ctx: click.Context, **options: Any) -> None:
    """Refine a lesion prior into a lesion mask with a CGC-regularised 3D U-Net.

    \b
    Single subject:
      cgc-refine --prior gmm --image sub-01_FLAIR.nii.gz
      cgc-refine --prior vae_scores.nii.gz --prior-kind scores --image FLAIR.nii.gz --fast
    Every subject of a folder or of a BIDS dataset (a line each, a summary table at the end):
      cgc-refine --prior gmm --image flair_folder/ --output-dir masks/ --keep-going
      cgc-refine --prior gmm --bids bids_root/ --bids-suffix FLAIR --fast
    Without --prior, a folder's subjects are refined from their own <id>_prior.nii.gz files
    (with --bids: from --prior-dir).
    See the subcommands below for priors, cohorts, saved models, evaluation and a demo.
    """
    if ctx.invoked_subcommand is not None:
        _hand_over(ctx, options)
        return
    if options["dump_config"]:
        click.echo(dump_config(_config(options)))
        ctx.exit(0)
    if not any(v for k, v in options.items() if k not in ("prior_kind", "modality", "device", "seed")):
        click.echo(ctx.get_help())
        ctx.exit(0)
    source = dataset.dataset_source(ctx, options["images"], options["bids"])
    dataset.check_usage(ctx, options, source)
    if source is not None:
        configure_logging(options["quiet"], options["verbose"])
        _refine_dataset(ctx, options, source)
        return
    if not options["prior"]:
        raise click.UsageError("missing option --prior (a prior file or a built-in prior, e.g. auto)",
                               ctx=ctx)
    if not options["images"]:
        raise click.UsageError("missing option --image (the lesion-bright image first)", ctx=ctx)
    configure_logging(options["quiet"], options["verbose"])
    _refine(ctx, options)


def _hand_over(ctx: click.Context, options: dict[str, Any]) -> None:
    """Before a subcommand: refuse single-subject options, pass -q/-v/--overwrite on."""
    configure_logging(options["quiet"], options["verbose"])
    given = [
        param.opts[-1] if param.opts else param.name
        for param in ctx.command.params
        if param.name in options and param.name not in _SHARED
        and ctx.get_parameter_source(param.name) != click.core.ParameterSource.DEFAULT
    ]
    if given:
        raise click.UsageError(
            f"{', '.join(sorted(given))} belong(s) to the single-subject form; put "
            f"subcommand options after '{ctx.invoked_subcommand}' or drop the subcommand",
            ctx=ctx,
        )
    ctx.obj = {k: options[k] for k in _SHARED}


def _config(options: dict[str, Any]) -> Any:
    return build_config(fast=options["fast"], config_file=options["config_file"],
                        values={name: options[name] for name in SINGLE_SUBJECT_SETTINGS})


def _refine(ctx: click.Context, options: dict[str, Any]) -> None:
    """Parse the single-subject options, run :func:`cgc_refine.workflow.refine_subject`, print."""
    from ..workflow import MASK_SUFFIX, PriorSpec, SubjectOutputs, refine_subject

    spec = PriorSpec(options["prior"], kind=options["prior_kind"], resample=options["resample_prior"],
                     on_image_grid=options["prior_on_image_grid"]).check()
    images = [Path(p) for p in options["images"]]
    outputs = SubjectOutputs.for_mask(resolve_output(images[0], options["output"], MASK_SUFFIX),
                                      probability=options["save_proba"], model=options["save_model"],
                                      report=options["report"])
    quiet = options["quiet"]
    result = refine_subject(images, spec, outputs, _config(options), brain_mask=options["brain_mask"],
                            truth=options["truth"], options=run_options(ctx, options),
                            progress=ConsoleProgress.for_console(quiet))
    if result is None:
        return  # a non-zero torchrun rank
    wrote(quiet, result.written)
    prior_mm3 = None if result.prior_ml is None else result.prior_ml * 1000.0
    say(quiet, summary_line(result.lesion_ml * 1000.0, prior_mm3, result.seconds))


def _dataset_prior(ctx: click.Context, options: dict[str, Any], subjects: list[Any]) -> Any:
    """The built-in prior of every subject of a dataset, or None to use each subject's own file.

    Raises
    ------
    click.UsageError
        A prior file, or a built-in prior with ``--prior-dir``.
    DatasetError
        Without ``--prior``, subjects without a prior file.
    """
    from ..exceptions import DatasetError
    from ..workflow import PriorSpec

    name = options["prior"]
    with_files = [s.id for s in subjects if s.prior is not None]
    if name is None:
        lacking = [s.id for s in subjects if s.prior is None]
        if lacking:
            more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
            raise DatasetError(
                f"no prior file for {', '.join(lacking[:5])}{more}: pass a built-in prior for "
                "every subject (e.g. --prior gmm), or give each subject its prior (<id>_prior.nii.gz "
                "beside its image, prior.nii.gz in its folder, or --prior-dir with --bids)")
        return None
    spec = PriorSpec(name, kind=options["prior_kind"], resample=options["resample_prior"],
                     on_image_grid=options["prior_on_image_grid"])
    if not spec.builtin:
        raise click.UsageError(
            f"--prior {name} is one image's prior; for a folder or a dataset name a built-in prior "
            f"({', '.join(BUILTIN_PRIORS)}), or omit --prior to refine each subject's own prior file "
            "(<id>_prior.nii.gz beside its image, or --prior-dir with --bids)", ctx=ctx)
    if options["prior_dir"] is not None:
        raise click.UsageError(f"--prior-dir gives each image its prior; drop --prior {name} to "
                               "refine those, or drop --prior-dir", ctx=ctx)
    if with_files:
        logger.warning("--prior %s is used for every subject; the prior files of %d subject(s) (%s) "
                       "are ignored (omit --prior to refine those)", name, len(with_files),
                       ", ".join(with_files[:5]) + (" ..." if len(with_files) > 5 else ""))
    return spec


def _refine_dataset(ctx: click.Context, options: dict[str, Any], source: Path) -> None:
    """The single-subject job on every subject of a folder or BIDS dataset."""
    from ..datasets import bids_sidecar_fields
    from ..workflow import PriorSpec, SubjectOutputs, refine_subject

    subjects = dataset.find_subjects(source, options)
    builtin = _dataset_prior(ctx, options, subjects)
    config = _config(options).validate()
    run = run_options(ctx, options)
    quiet = options["quiet"]

    def job(subject: Any, paths: Any) -> Any:
        prior = builtin or PriorSpec(subject.prior, kind=options["prior_kind"],
                                     resample=options["resample_prior"],
                                     on_image_grid=options["prior_on_image_grid"])
        outputs = SubjectOutputs.for_mask(paths.mask, probability=options["save_proba"],
                                          report=options["report"],
                                          sidecar_fields=bids_sidecar_fields(subject) or None)
        return refine_subject(subject.images, prior, outputs, config, brain_mask=subject.brain_mask,
                              options=run, progress=dataset.SubjectProgress.for_console(quiet))

    dataset.run_subjects(ctx, subjects, job, options=options, overwrite=run.overwrite, quiet=quiet)
