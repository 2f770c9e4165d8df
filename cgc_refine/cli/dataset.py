"""Folders and BIDS datasets on the command line.

``--image FOLDER`` or ``--bids DATASET`` (options: :func:`cgc_refine.cli.options.dataset_options`)
turns the single-subject command and ``predict`` into a run over every subject found by
:mod:`cgc_refine.datasets`: one result line per subject, a summary table at the end (also
written as ``cgc_refine_summary.tsv`` in the output folder) and, for BIDS, a derivatives
folder with its ``dataset_description.json`` and the BIDS fields in every sidecar.

Exit codes: 0 when every subject succeeded; with ``--keep-going`` and failed subjects, one line
``cgc-refine: error: N of M subject(s) failed ...`` after the summary and exit code 2 (1 when a
failure was unexpected, not a :class:`~cgc_refine.exceptions.CGCRefineError`); without it the
first failure ends the run as for one subject. An interrupt keeps the finished subjects'
outputs and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from ..exceptions import CGCRefineError
from .app import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_UNEXPECTED, _Terminated
from .console import PROG, ConsoleProgress, say

__all__ = ["DATASET_ONLY", "SubjectProgress", "check_usage", "dataset_source", "find_subjects",
           "run_subjects"]

logger = logging.getLogger("cgc_refine.cli")

#: The options that only a folder or BIDS run takes (parameter names).
DATASET_ONLY = ("bids_suffix", "bids_filters", "participants", "image_suffix", "extra_suffixes",
                "prior_dir", "prior_pattern", "brain_mask_dir", "mask_pattern", "output_dir",
                "keep_going", "skip_existing")
_BIDS_ONLY = ("bids_suffix", "bids_filters", "participants", "prior_dir", "prior_pattern",
              "brain_mask_dir", "mask_pattern")

#: Options of one subject that a folder or BIDS run refuses, and what to do instead.
SINGLE_ONLY = {
    "output": "write a folder's or dataset's outputs with --output-dir DIR",
    "brain_mask": "name each subject's brain mask <id>_brainmask.nii.gz beside its image, or "
                  "give --brain-mask-dir with --bids",
    "truth": "score the masks of a dataset afterwards with 'cgc-refine evaluate'",
    "save_model": "train one model on a cohort with 'cgc-refine fit'",
}


def _flag(ctx: click.Context, name: str) -> str:
    """The command-line spelling of parameter ``name`` (``--output``)."""
    for param in ctx.command.params:
        if param.name == name and param.opts:
            return max(param.opts, key=len)
    return name


def dataset_source(ctx: click.Context, images: Sequence[str], bids: str | None) -> Path | None:
    """The folder or BIDS dataset to process, or None when ``images`` are one subject's files.

    Raises
    ------
    click.UsageError
        ``--bids`` with ``--image``, or a folder among several ``--image``.
    """
    if bids is not None:
        if images:
            raise click.UsageError("give either --bids DATASET or --image, not both", ctx=ctx)
        return Path(bids)
    folders = [image for image in images if Path(image).is_dir()]
    if not folders:
        return None
    if len(images) > 1:
        raise click.UsageError(
            f"--image {folders[0]} is a folder, which goes alone: the further modalities of its "
            "subjects are found beside their images with --extra-suffix", ctx=ctx)
    return Path(folders[0])


def check_usage(ctx: click.Context, options: Mapping[str, Any], source: Path | None) -> None:
    """Refuse the options that do not fit a run over one subject, a folder or a BIDS dataset.

    Raises
    ------
    click.UsageError
    """
    if source is None:
        given = [name for name in DATASET_ONLY if options.get(name)]
        if given:
            raise click.UsageError(
                f"{_flag(ctx, given[0])} goes with a folder (--image FOLDER) or a BIDS dataset "
                "(--bids DATASET), not with image files", ctx=ctx)
        return
    for name, instead in SINGLE_ONLY.items():
        if options.get(name):
            raise click.UsageError(
                f"{_flag(ctx, name)} belongs to a run on one subject; {instead}", ctx=ctx)
    if options.get("bids") is None:
        given = [name for name in _BIDS_ONLY if options.get(name)]
        if given:
            raise click.UsageError(f"{_flag(ctx, given[0])} goes with --bids DATASET", ctx=ctx)
    elif options.get("image_suffix"):
        raise click.UsageError("--image-suffix goes with --image FOLDER; with --bids the image is "
                               "chosen by --bids-suffix", ctx=ctx)


def find_subjects(source: Path, options: Mapping[str, Any]) -> list[Any]:
    """The subjects of the folder or BIDS dataset ``source`` (:mod:`cgc_refine.datasets`).

    Options not given keep the discovery functions' defaults.
    """
    from ..datasets import find_bids_subjects, find_folder_subjects

    if options.get("bids") is None:
        given = {"image_suffix": options.get("image_suffix")}
        given = {k: v for k, v in given.items() if v is not None}
        return find_folder_subjects(source, extra_suffixes=tuple(options.get("extra_suffixes") or ()),
                                    **given)
    optional = {"suffix": options.get("bids_suffix"), "prior_dir": options.get("prior_dir"),
                "prior_pattern": options.get("prior_pattern"),
                "mask_dir": options.get("brain_mask_dir"), "mask_pattern": options.get("mask_pattern")}
    return find_bids_subjects(
        source, extra_suffixes=tuple(options.get("extra_suffixes") or ()),
        filters=dict(options.get("bids_filters") or ()),
        participants=list(options["participants"]) if options.get("participants") else None,
        allow_missing=bool(options.get("keep_going")),
        **{k: v for k, v in optional.items() if v is not None},
    )


class SubjectProgress(ConsoleProgress):
    """The progress of one subject of a dataset: bars or log lines as for one subject, but its
    notes (the prior's summary) are log lines at INFO level (shown with -v), so that the
    subject's result is the one line of :func:`cgc_refine.datasets.run_dataset`."""

    def note(self, message: str) -> None:
        logger.info("%s", message)


def run_subjects(
    ctx: click.Context, subjects: Sequence[Any], job: Callable[[Any, Any], Any], *,
    options: Mapping[str, Any], overwrite: bool, quiet: bool,
) -> None:
    """Run ``job(subject, outputs)`` on every subject, print a line each and the summary.

    Parameters
    ----------
    ctx : click.Context
        Ends the command with a non-zero exit code when subjects failed (``--keep-going``).
    subjects : sequence of DatasetSubject
        From :func:`find_subjects`.
    job : callable
        The single-subject job; gets the subject and its :class:`cgc_refine.datasets.OutputPaths`.
    options : mapping
        The command's options (``output_dir``, ``keep_going``, ``skip_existing``).
    overwrite : bool
        Existing outputs may be replaced.
    quiet : bool
        No result lines and no table (-q).
    """
    from ..datasets import run_dataset
    from ..distributed import is_main_process

    # Under torchrun every rank trains, but only rank 0 predicts and writes (the job returns
    # None elsewhere): the other ranks print nothing and write no summary.
    main = is_main_process()
    failures: dict[str, Exception] = {}
    finished: list[str] = []

    def guarded(subject: Any, outputs: Any) -> Any:
        try:
            result = job(subject, outputs)
        except Exception as exc:
            failures[subject.id] = exc
            raise
        finished.append(subject.id)
        return result

    try:
        summary = run_dataset(subjects, guarded, output_dir=options.get("output_dir"),
                              keep_going=bool(options.get("keep_going")),
                              skip_existing=bool(options.get("skip_existing")), overwrite=overwrite,
                              summary_tsv=main, echo=lambda text: say(quiet or not main, text))
    except KeyboardInterrupt as exc:
        kept = (f"the outputs of the {len(finished)} subject(s) finished before are kept, "
                "the subject in progress wrote none; run the same command with --skip-existing "
                "to go on") if finished else "no subject's output was written"
        click.echo(f"{PROG}: interrupted; {kept}", err=True)
        ctx.exit(EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED)
    if summary.tsv is not None:
        say(quiet, f"wrote {summary.tsv}")
    if summary.n_failed:
        failed = [row.id for row in summary.rows if row.status == "failed"]
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        where = f" and in {summary.tsv}" if summary.tsv is not None else ""
        click.echo(f"{PROG}: error: {len(failed)} of {len(subjects)} subject(s) failed ({shown}); "
                   f"their errors are in the summary above{where}", err=True)
        expected = all(isinstance(exc, CGCRefineError) for exc in failures.values())
        ctx.exit(EXIT_ERROR if expected else EXIT_UNEXPECTED)
