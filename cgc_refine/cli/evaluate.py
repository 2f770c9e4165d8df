"""``cgc-refine evaluate``: score masks against ground truth and print a table."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..workflow.evaluation import METRIC_NAMES
from .console import say, sub_logging

__all__ = ["METRIC_NAMES", "evaluate_command"]


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}"


@click.command("evaluate")
@click.option("--pred", required=True, metavar="PRED", help="Predicted mask, or a folder of them.")
@click.option("--truth", required=True, metavar="TRUTH",
              help="Ground-truth mask, or a folder with files of the same names.")
@click.option("-o", "--csv", "csv_out", default=None, metavar="CSV",
              help="Write the per-subject metrics and the mean to this CSV file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing CSV file.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the table.")
@click.option("-v", "--verbose", count=True, help="More messages.")
@click.pass_context
def evaluate_command(
    ctx: click.Context, pred: str, truth: str, csv_out: str | None, overwrite: bool, quiet: bool,
    verbose: int,
) -> None:
    """Dice, sensitivity, precision, HD95 and ASSD (mm) of masks against ground truth.

    Foreground is every value > 0 in both files; distances use the truth file's voxel size.
    The mean ignores undefined (nan) values; HD95/ASSD are inf when exactly one mask is empty.
    """
    from ..workflow.evaluation import check_scores_output, evaluate_masks, pair_masks, scores_csv

    quiet, _ = sub_logging(ctx, quiet, verbose)
    overwrite = overwrite or bool((ctx.obj or {}).get("overwrite"))
    csv_path = Path(csv_out) if csv_out else None
    pairs = pair_masks(Path(pred), Path(truth))
    if csv_path is not None:
        check_scores_output(csv_path, pairs, overwrite)
    rows, mean = evaluate_masks(pairs)
    width = max(8, *(len(n) for n, _ in rows))
    click.echo(f"{'subject':<{width}}  " + "  ".join(f"{k:>11}" for k in METRIC_NAMES))
    for name, scores in [*rows, ("mean", mean)]:
        click.echo(f"{name:<{width}}  " + "  ".join(f"{_fmt(scores[k]):>11}" for k in METRIC_NAMES))
    if csv_path is not None:
        scores_csv(csv_path, pairs, rows, mean, overwrite=overwrite)
        say(quiet, f"wrote {csv_path}")
