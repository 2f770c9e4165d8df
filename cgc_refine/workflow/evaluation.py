"""Scoring saved masks against ground truth: files or folders matched by name, a CSV table."""

from __future__ import annotations

import csv
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from .._utils import write_text_atomic
from ..exceptions import InvalidImageError
from .inputs import dropping
from .results import check_outputs, is_nifti_name, strip_nifti

__all__ = ["METRIC_NAMES", "evaluate_masks", "pair_masks", "scores_csv"]

logger = logging.getLogger("cgc_refine.workflow")

#: The metrics of :func:`cgc_refine.metrics.evaluate`, in table order.
METRIC_NAMES = ("dice", "sensitivity", "precision", "hd95", "assd")

Row = tuple[str, dict[str, float]]


def pair_masks(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    """(name, prediction, truth) triples from two files or two folders matched by file name.

    Raises
    ------
    InvalidImageError
        When one is a file and the other a folder, or no file has a match.
    """
    if pred.is_dir() != truth.is_dir() and pred.exists() and truth.exists():
        raise InvalidImageError(
            f"--pred '{pred}' and --truth '{truth}' must both be files or both be folders"
        )
    if not pred.is_dir():
        return [(strip_nifti(pred.name)[0], pred, truth)]
    if not truth.is_dir():
        raise InvalidImageError(f"truth folder '{truth}' does not exist; check the path")
    pairs, unmatched = [], []
    for candidate in sorted(pred.iterdir()):
        if not candidate.is_file() or not is_nifti_name(candidate) or candidate.name.startswith("."):
            continue
        match = truth / candidate.name
        if match.is_file():
            pairs.append((strip_nifti(candidate.name)[0], candidate, match))
        else:
            unmatched.append(candidate.name)
    if unmatched:
        logger.warning("%d prediction(s) have no truth file of the same name in '%s': %s",
                       len(unmatched), truth, ", ".join(unmatched[:5]))
    if not pairs:
        raise InvalidImageError(
            f"no NIfTI file of '{pred}' has a file of the same name in '{truth}'; name the "
            "predictions and the truth masks alike"
        )
    return pairs


def evaluate_masks(pairs: Sequence[tuple[str, Path, Path]]) -> tuple[list[Row], dict[str, float]]:
    """Score every pair (foreground: values > 0; distances in the truth file's voxel size).

    Returns
    -------
    (list of (name, scores), dict)
        The per-pair scores and their mean, ignoring undefined (nan) values.
    """
    import numpy as np

    from ..io import load_array, load_volume
    from ..metrics import evaluate

    rows: list[Row] = []
    for name, pred_path, truth_path in pairs:
        with dropping("cgc_refine.io", "is constant", "holds no voxel"):  # empty masks are valid
            truth_volume = load_volume(truth_path, name="truth")
            pred_data, _ = load_array(pred_path, reference=truth_volume, name="prediction",
                                      error=InvalidImageError)
        rows.append((name, evaluate(pred_data, truth_volume.data[0], spacing=truth_volume.spacing)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {k: float(np.nanmean([r[k] for _, r in rows])) for k in METRIC_NAMES}
    return rows, mean


def scores_csv(path: Path, pairs: Sequence[tuple[str, Path, Path]], rows: Sequence[Row],
               mean: dict[str, float], *, overwrite: bool) -> Path:
    """Write the per-pair scores and the mean as CSV (full precision); returns ``path``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["subject", "pred", "truth", *METRIC_NAMES])
    for (name, scores), (_, pred_path, truth_path) in zip(rows, pairs):
        writer.writerow([name, str(pred_path), str(truth_path),
                         *(repr(float(scores[k])) for k in METRIC_NAMES)])
    writer.writerow(["mean", "", "", *(repr(mean[k]) for k in METRIC_NAMES)])
    return write_text_atomic(path, buffer.getvalue(), overwrite=overwrite)


def check_scores_output(path: Path, pairs: Sequence[tuple[str, Path, Path]], overwrite: bool) -> None:
    """Check the CSV output before scoring (writable, not an input)."""
    check_outputs([], [(path, "CSV")], [p for _, a, b in pairs for p in (a, b)], overwrite)
