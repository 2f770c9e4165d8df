"""Running one job per subject of a dataset, with a progress line per subject and a summary
table at the end."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from .._utils import atomic_write
from ..exceptions import CGCRefineError, DatasetError, OutputExistsError
from ._discovery import DatasetSubject, PathLike, _listing
from ._outputs import OutputPaths, bids_derivatives_dir, plan_outputs, write_dataset_description

logger = logging.getLogger(__name__)

SUMMARY_NAME = "cgc_refine_summary.tsv"


@dataclass(frozen=True)
class SubjectRow:
    """One row of a dataset run's summary."""

    id: str
    status: Literal["ok", "failed", "skipped"]
    seconds: float
    lesion_ml: float | None = None
    prior_ml: float | None = None
    error: str | None = None
    outputs: OutputPaths | None = None

    @property
    def change_ml(self) -> float | None:
        """Lesion volume minus the prior's (ml), when both are known."""
        if self.lesion_ml is None or self.prior_ml is None:
            return None
        return self.lesion_ml - self.prior_ml


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`run_dataset` returns: the rows, the text table and the TSV written (if any)."""

    rows: tuple[SubjectRow, ...]
    table: str
    tsv: Path | None = None

    @property
    def n_failed(self) -> int:
        """Number of subjects that failed."""
        return sum(row.status == "failed" for row in self.rows)

    @property
    def n_ok(self) -> int:
        """Number of subjects processed successfully."""
        return sum(row.status == "ok" for row in self.rows)


def _volume(result: Any, name: str) -> float | None:
    """``<name>_ml`` of a job's result (a mapping, or an object such as
    :class:`cgc_refine.workflow.SubjectResult`), or its ``<name>_mm3`` / 1000."""
    if result is None:
        return None
    for key, scale in ((f"{name}_ml", 1.0), (f"{name}_mm3", 1e-3)):
        value = result.get(key) if isinstance(result, Mapping) else getattr(result, key, None)
        if value is not None:
            return float(value) * scale
    return None


def _change_text(row: SubjectRow) -> str:
    change = row.change_ml
    if change is None:
        return "-"
    relative = f" ({100.0 * change / row.prior_ml:+.0f}%)" if row.prior_ml else ""
    return f"{change:+.2f}{relative}"


def _cells(row: SubjectRow) -> list[str]:
    lesion = "-" if row.lesion_ml is None else f"{row.lesion_ml:.2f}"
    status = row.status if row.error is None else f"{row.status}: {row.error}"
    return [row.id, status, lesion, _change_text(row), f"{row.seconds:.1f}"]


def format_summary(rows: Sequence[SubjectRow]) -> str:
    """A plain-text table: subject, status, lesion (ml), change vs prior (ml, %), seconds."""
    header = ["subject", "status", "lesion ml", "vs prior ml", "seconds"]
    body = [_cells(row) for row in rows]
    for cells in body:  # keep the table narrow: long error messages are cut
        if len(cells[1]) > 60:
            cells[1] = cells[1][:57] + "..."
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    right = {2, 3, 4}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    total = sum(row.seconds for row in rows)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "skipped")}
    footer = (f"{len(rows)} subject(s): {counts['ok']} ok, {counts['failed']} failed, "
              f"{counts['skipped']} skipped, {total:.1f} s in all")
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(c) for c in body), rule, footer])


def write_summary_tsv(rows: Sequence[SubjectRow], path: PathLike, *, overwrite: bool = False) -> Path:
    """Write the summary as a tab-separated file (atomically; ``n/a`` for unknown values)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["subject", "status", "lesion_ml", "prior_ml", "change_ml", "seconds", "mask", "error"])
    for row in rows:
        def num(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        writer.writerow([row.id, row.status, num(row.lesion_ml), num(row.prior_ml), num(row.change_ml),
                         f"{row.seconds:.2f}", row.outputs.mask if row.outputs else "n/a",
                         " ".join((row.error or "n/a").split())])
    text = buffer.getvalue()
    return atomic_write(Path(path), lambda handle: handle.write(text), overwrite=overwrite,
                        binary=False, what="summary table")


def _summary_root(subjects: Sequence[DatasetSubject], output_dir: PathLike | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    if subjects[0].layout == "bids":
        return bids_derivatives_dir(subjects[0].root)
    return subjects[0].root


def _check_free(plan: Mapping[str, OutputPaths]) -> None:
    """Fail before any work when outputs exist (rather than after hours, at subject 7)."""
    taken = [p for o in plan.values() for p in (o.mask, o.sidecar) if os.path.lexists(p)]
    if taken:
        raise OutputExistsError(
            f"{len(taken)} output file(s) exist already ({_listing(taken)}); add --overwrite to "
            "replace them, or --skip-existing to process only the subjects without outputs"
        )


def _run_subject(
    subject: DatasetSubject, outputs: OutputPaths, run_one: Callable[..., Any], skip_existing: bool
) -> tuple[SubjectRow, Exception | None]:
    """Run one job; its row, and the error it raised (None on success)."""
    started = time.perf_counter()
    if skip_existing and outputs.mask.exists():
        return SubjectRow(subject.id, "skipped", 0.0, error="outputs exist", outputs=outputs), None
    try:
        outputs.folder.mkdir(parents=True, exist_ok=True)
        result = run_one(subject, outputs)
    except Exception as exc:  # noqa: BLE001 - recorded, and re-raised by the caller unless keep_going
        text = str(exc) if isinstance(exc, CGCRefineError) else f"{type(exc).__name__}: {exc}"
        logger.debug("subject %s failed", subject.id, exc_info=True)
        row = SubjectRow(subject.id, "failed", time.perf_counter() - started,
                            error=" ".join(text.split()) or type(exc).__name__, outputs=outputs)
        return row, exc
    row = SubjectRow(subject.id, "ok", time.perf_counter() - started, lesion_ml=_volume(result, "lesion"),
                        prior_ml=_volume(result, "prior"), outputs=outputs)
    return row, None


def _progress_line(index: int, total: int, row: SubjectRow) -> str:
    text = f"[{index}/{total}] {row.id}: {row.status}"
    if row.lesion_ml is not None:
        text += f", lesion {row.lesion_ml:.2f} ml"
        if row.change_ml is not None:
            text += f" ({_change_text(row)} ml vs prior)"
    if row.error:
        text += f" ({row.error})"
    return f"{text}, {row.seconds:.1f} s"


def run_dataset(
    subjects: Sequence[DatasetSubject],
    run_one: Callable[[DatasetSubject, OutputPaths], Any],
    *,
    output_dir: PathLike | None = None,
    keep_going: bool = False,
    skip_existing: bool = False,
    overwrite: bool = False,
    summary_tsv: bool | PathLike = True,
    echo: Callable[[str], None] | None = None,
) -> DatasetSummary:
    """Run ``run_one(subject, outputs)`` for every subject; log progress; summarise.

    Parameters
    ----------
    subjects : sequence of DatasetSubject
        From :func:`find_bids_subjects` or :func:`find_folder_subjects`.
    run_one : callable
        The single-subject job. It writes the files named by its :class:`OutputPaths`
        (whose folder exists) and returns, for the summary, a mapping or an object (such as
        :class:`cgc_refine.workflow.SubjectResult`) with ``lesion_ml`` (or ``lesion_mm3``) and,
        optionally, ``prior_ml`` (or ``prior_mm3``).
    output_dir : path, optional
        See :func:`output_paths`.
    keep_going : bool
        Record a failing subject's error and go on; else stop and re-raise it (after the
        summary of the subjects so far is logged and written).
    skip_existing : bool
        Skip subjects whose mask exists (to resume an interrupted dataset run).
    overwrite : bool
        Outputs may be replaced (``run_one`` must be told so too); without it or
        ``skip_existing``, existing outputs are refused before any subject runs.
    summary_tsv : bool or path
        Write the summary as ``cgc_refine_summary.tsv`` in the output root (True), at this path,
        or not (False). An existing summary without ``overwrite`` gets a timestamped name.
    echo : callable, optional
        Called with each progress line and with the final table (e.g. ``click.echo``); the
        lines are logged at INFO level without ``echo``, at DEBUG level with it.

    Returns
    -------
    DatasetSummary

    Raises
    ------
    DatasetError
        No subject, or two subjects share an output file.
    OutputExistsError
        Outputs exist, or a foreign ``dataset_description.json`` is in the derivatives folder.
    Exception
        The first failing subject's error, unless ``keep_going``.
    """
    if not subjects:
        raise DatasetError("no subject to process; check the input folder")

    def say(text: str) -> None:
        # Echoed lines are logged at DEBUG only, so that a console that shows both does not
        # show them twice.
        logger.log(logging.INFO if echo is None else logging.DEBUG, "%s", text)
        if echo is not None:
            echo(text)

    plan = plan_outputs(subjects, output_dir=output_dir)
    if not overwrite and not skip_existing:
        _check_free(plan)
    root = _summary_root(subjects, output_dir)
    if subjects[0].layout == "bids":
        write_dataset_description(root, source_root=subjects[0].root)
    rows: list[SubjectRow] = []
    try:
        for index, subject in enumerate(subjects, start=1):
            row, error = _run_subject(subject, plan[subject.id], run_one, skip_existing)
            rows.append(row)
            say(_progress_line(index, len(subjects), row))
            if error is not None and not keep_going:
                raise error
    finally:
        table = format_summary(rows)
        say(table)
        tsv = _write_summary(rows, root, summary_tsv, overwrite) if rows else None
    return DatasetSummary(rows=tuple(rows), table=table, tsv=tsv)


def _write_summary(
    rows: Sequence[SubjectRow], root: Path, where: bool | PathLike, overwrite: bool
) -> Path | None:
    if where is False:
        return None
    path = root / SUMMARY_NAME if where is True else Path(where)
    if path.exists() and not overwrite:  # keep the earlier run's table: a new name
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        candidates = (path.with_name(f"{path.stem}-{stamp}{'' if n == 0 else f'-{n}'}{path.suffix}")
                      for n in itertools.count())
        path = next(c for c in candidates if not c.exists())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        written = write_summary_tsv(rows, path, overwrite=overwrite)
    except (OSError, CGCRefineError) as exc:  # the run's results matter more than their table
        logger.warning("could not write the summary table %s: %s", path, exc)
        return None
    logger.info("summary table written to %s", written)
    return written
