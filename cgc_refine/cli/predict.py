"""``cgc-refine predict``: segment one subject, or every subject of a folder or BIDS dataset,
with a saved model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..priors import BUILTIN_PRIORS
from . import dataset
from .console import ConsoleProgress, say, sub_logging, summary_line, wrote
from .options import (
    common_options,
    dataset_options,
    device_options,
    postprocess_options,
    prior_kind_option,
    report_option,
    run_options,
    truth_option,
)
from .outputs import resolve_output

__all__ = ["predict_command"]


@click.command("predict")
@click.option("--model", "model", required=True, metavar="MODEL",
              help="Model written by fit or --save-model.")
@click.option("--image", "images", multiple=True, metavar="IMG",
              help="Image file; repeat for several modalities, in the model's order. Or a "
                   "folder: every subject in it (<id>.nii.gz files, or one sub-folder per subject).")
@click.option("--brain-mask", default=None, metavar="MASK", help="Brain mask (default: derived).")
@click.option("--prior", "prior", default=None, metavar="PRIOR",
              help="This subject's prior (a map, or a built-in prior: " + ", ".join(BUILTIN_PRIORS)
                   + "; for a folder or dataset only a built-in one): the output is then blended "
                     "with it and guarded as the single-subject command's is. Needed by a model "
                     "fitted with --intensity-alignment prior.")
@prior_kind_option
@click.option("--save-proba", is_flag=True, help="Also write the probability map.")
@truth_option
@report_option
@dataset_options(priors=False)
@postprocess_options
@device_options
@common_options(output_help="Output mask file (.nii.gz) or folder (default: next to the image).")
@click.pass_context
def predict_command(ctx: click.Context, **options: Any) -> None:
    """Segment one subject, or every subject of a folder or BIDS dataset, with a saved model.

    \b
    With the subject's prior, as the single-subject command outputs (blend, guard):
      cgc-refine predict --model model.pt --image flair.nii.gz --prior gmm

    \b
    Every subject of a folder or of a BIDS dataset (a line each, a summary table at the end):
      cgc-refine predict --model model.pt --image flair_folder/ --output-dir masks/
      cgc-refine predict --model model.pt --bids bids_root/ --keep-going
    """
    from ..workflow import MASK_SUFFIX, SubjectOutputs, predict_subject

    quiet, _ = sub_logging(ctx, options["quiet"], options["verbose"])
    source = dataset.dataset_source(ctx, options["images"], options["bids"])
    dataset.check_usage(ctx, options, source)
    run = run_options(ctx, {"device": options["device"], "threads": options["threads"],
                            "overwrite": options["overwrite"]})
    post = {"threshold": options["threshold"], "min_size_mm3": options["min_size_mm3"]}
    prior = _prior_spec(ctx, options, dataset_run=source is not None)
    if prior is not None:
        post["prior"] = prior
    if source is not None:
        _predict_dataset(ctx, options, source, run, post, quiet)
        return
    if not options["images"]:
        raise click.UsageError("missing option --image (an image file or a folder) or --bids", ctx=ctx)
    image_paths = [Path(p) for p in options["images"]]
    outputs = SubjectOutputs.for_mask(resolve_output(image_paths[0], options["output"], MASK_SUFFIX),
                                      probability=options["save_proba"], report=options["report"])
    result = predict_subject(options["model"], image_paths, outputs, brain_mask=options["brain_mask"],
                             truth=options["truth"], options=run,
                             progress=ConsoleProgress.for_console(quiet), **post)
    wrote(quiet, result.written)
    say(quiet, summary_line(result.lesion_ml * 1000.0, None, result.seconds))


def _predict_dataset(ctx: click.Context, options: dict[str, Any], source: Path, run: Any,
                     post: dict[str, Any], quiet: bool) -> None:
    """The saved model on every subject of a folder or BIDS dataset."""
    from ..datasets import bids_sidecar_fields
    from ..workflow import SubjectOutputs, predict_subject

    subjects = dataset.find_subjects(source, options)
    models: dict[Any, Any] = {}  # the model is read once for all subjects

    def job(subject: Any, paths: Any) -> Any:
        outputs = SubjectOutputs.for_mask(paths.mask, probability=options["save_proba"],
                                          report=options["report"],
                                          sidecar_fields=bids_sidecar_fields(subject) or None)
        return predict_subject(options["model"], subject.images, outputs, brain_mask=subject.brain_mask,
                               options=run, progress=dataset.SubjectProgress.for_console(quiet),
                               loaded_models=models, **post)

    dataset.run_subjects(ctx, subjects, job, options=options, overwrite=run.overwrite, quiet=quiet)


def _prior_spec(ctx: click.Context, options: dict[str, Any], *, dataset_run: bool) -> Any:
    """``--prior`` as a :class:`~cgc_refine.workflow.PriorSpec` (None without it)."""
    from ..workflow import PriorSpec

    if options["prior"] is None:
        return None
    spec = PriorSpec(options["prior"], kind=options["prior_kind"])
    if dataset_run and not spec.builtin:
        raise click.UsageError(
            f"--prior {options['prior']} is one image's prior; for a folder or a dataset name a "
            f"built-in prior ({', '.join(BUILTIN_PRIORS)})", ctx=ctx)
    return spec.check()
