"""``cgc-refine fit``: train one model on a cohort (no ground truth used) and save it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..priors import BUILTIN_PRIORS
from .console import STATE, ConsoleProgress, sub_logging, wrote
from . import options as opt

__all__ = ["fit_command"]


@click.command("fit")
@click.option("--cohort", default=None, metavar="DIR",
              help="Folder with one sub-folder per subject (use with --image-pattern).")
@click.option("--image-pattern", "image_patterns", multiple=True, metavar="GLOB",
              help="File pattern of a modality inside each subject folder; repeat, lesion-bright first.")
@click.option("--prior-pattern", default=None, metavar="GLOB", help="File pattern of the prior maps.")
@click.option("--mask-pattern", default=None, metavar="GLOB", help="File pattern of the brain masks.")
@click.option("--csv", "csv_file", default=None, metavar="FILE",
              help="CSV with columns subject, image (or image1, image2...), optional prior, brain_mask.")
@click.option("--prior", default=None, type=click.Choice(BUILTIN_PRIORS),
              help="Built-in prior when the cohort has no prior files (default gmm).")
@opt.prior_kind_option
@opt.modality_option
@click.option("--resample-prior", is_flag=True, help="Resample prior files onto their image grids.")
@click.option("--cache-dir", default=None, metavar="DIR",
              help="Preprocess each subject once into this folder (keyed by the inputs' "
                   "content); training then reads only its crops from disk, and reruns skip "
                   "loading, priors and preprocessing.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Write a checkpoint (MODEL.ckpt) every N iterations (0: none); it is kept "
                   "when the fit is interrupted and removed when the fit finishes.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted fit from MODEL.ckpt; give the same options as the "
                   "interrupted command (same cohort, seed and configuration).")
@opt.config_options(opt.FIT_SETTINGS)
@opt.settings_file_options
@opt.training_options
@opt.common_options(output_help="Model file to write (e.g. model.pt); required.")
@click.pass_context
def fit_command(ctx: click.Context, **options: Any) -> None:
    """Train one model on a cohort (no ground truth used) and save it.

    Under torchrun (e.g. 'torchrun --standalone --nproc_per_node 2 -m cgc_refine fit ...')
    every process trains one replica of a DistributedDataParallel model; only rank 0 writes.
    """
    from ..workflow import checkpoint_path_for, find_cohort, fit_cohort

    quiet, _ = sub_logging(ctx, options["quiet"], options["verbose"])
    config = opt.build_config(fast=options["fast"], config_file=options["config_file"],
                              values={name: options[name] for name in opt.FIT_SETTINGS})
    if options["dump_config"]:
        click.echo(opt.dump_config(config))
        ctx.exit(0)
    _check_usage(ctx, options)
    subjects, _ = find_cohort(cohort=options["cohort"], image_patterns=options["image_patterns"],
                              prior_pattern=options["prior_pattern"], mask_pattern=options["mask_pattern"],
                              csv=options["csv_file"])
    if any(s.prior is not None for s in subjects) and options["prior"] is not None:
        raise click.UsageError("the cohort has prior files; drop --prior or the prior "
                               "pattern/column", ctx=ctx)
    model = Path(options["output"])
    if options["checkpoint_every"] or options["resume"]:
        STATE["checkpoint"] = checkpoint_path_for(model)  # named by the interrupt line
    sources = {"cohort": _absolute(options["cohort"]), "csv": _absolute(options["csv_file"]),
               "image_patterns": list(options["image_patterns"]),
               "prior_pattern": options["prior_pattern"], "mask_pattern": options["mask_pattern"]}
    result = fit_cohort(subjects, model, config, prior=options["prior"], prior_kind=options["prior_kind"],
                        resample_prior=options["resample_prior"], cache_dir=options["cache_dir"],
                        checkpoint_every=options["checkpoint_every"], resume=options["resume"],
                        sources=sources, options=opt.run_options(ctx, options),
                        progress=ConsoleProgress.for_console(quiet))
    STATE["checkpoint"] = None
    if result is not None:
        wrote(quiet, result.written)


def _absolute(path: str | None) -> str | None:
    from ..workflow.results import absolute

    return absolute(path)


def _check_usage(ctx: click.Context, options: dict[str, Any]) -> None:
    """The combinations of options fit refuses, as usage errors."""
    if options["output"] is None:
        raise click.UsageError("missing option -o/--output (the model file to write)", ctx=ctx)
    if (options["cohort"] is None) == (options["csv_file"] is None):
        raise click.UsageError("give exactly one of --cohort DIR or --csv FILE", ctx=ctx)
    if options["cohort"] is not None and not options["image_patterns"]:
        raise click.UsageError("--cohort needs at least one --image-pattern", ctx=ctx)
    if options["csv_file"] is not None and (options["image_patterns"] or options["prior_pattern"]
                                            or options["mask_pattern"]):
        raise click.UsageError("--image-pattern/--prior-pattern/--mask-pattern go with --cohort, "
                               "not with --csv", ctx=ctx)
