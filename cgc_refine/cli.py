"""The ``cgc-refine`` command line.

Single subject (no subcommand)::

    cgc-refine --prior PRIOR --image FLAIR.nii.gz [--image T1.nii.gz ...] [--brain-mask M] [-o OUT]

``PRIOR`` is a NIfTI map (a probability map, a mask, a label map, logits or anomaly scores,
see ``--prior-kind``) or the name of a built-in prior (``gmm``, ``mumford-shah``). The prior
is refined by a CGC U-Net trained on this one subject, and the refined mask is written next
to the first image as ``<stem>_label-lesion_mask.nii.gz`` with a JSON sidecar.

Subcommands: ``prior`` (write a built-in prior), ``fit`` (train one model on a cohort),
``predict`` (apply a saved model), ``evaluate`` (score masks against ground truth) and
``demo`` (a synthetic phantom end to end).

Every failure the toolkit anticipates ends in one line ``cgc-refine: error: <message>`` on
standard error and exit code 2, before any output is written; unexpected failures exit with
1 (traceback with ``-v``); an interrupt exits with 130 and leaves no partial output.

Heavy modules (torch, nibabel, numpy, the refiner) are imported inside the commands, so
``cgc-refine --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from ._version import __version__
from .config import LESION_PATTERNS
from .exceptions import (
    CGCRefineError,
    EmptyMaskError,
    InvalidImageError,
    InvalidPriorError,
    OutputNotWritableError,
)
from .priors import BUILTIN_PRIORS  # the one registry of built-in priors; imports nothing heavy

__all__ = ["main"]

PROG = "cgc-refine"
PRIOR_KINDS = ("auto", "probability", "percent", "probability-255", "mask", "scores", "labels",
               "logits")
MASK_SUFFIX = "label-lesion_mask"
PROBSEG_SUFFIX = "label-lesion_probseg"
EXIT_ERROR = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as shells report a kill

logger = logging.getLogger("cgc_refine.cli")

# Per-invocation state: the verbosity (for tracebacks) and the arguments (for sidecars).
_STATE: dict[str, Any] = {"verbose": 0, "argv": []}


# --------------------------------------------------------------------------------------------
# Logging, warnings and progress
# --------------------------------------------------------------------------------------------


class _EchoHandler(logging.Handler):
    """Log records as ``cgc-refine: <level>: <message>`` lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().split())
        level = record.levelname.lower()
        if _STATE["verbose"] >= 2:
            return f"{PROG}: {level}: [{record.name}] {message}"
        return f"{PROG}: {level}: {message}"


def _configure_logging(quiet: bool, verbose: int) -> None:
    """Set up the ``cgc_refine`` logger: WARNING, INFO with -v, DEBUG with -vv, ERROR with -q."""
    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose cannot be used together")
    _STATE["verbose"] = max(_STATE["verbose"], verbose)
    _STATE["quiet"] = quiet
    root = logging.getLogger("cgc_refine")
    _remove_handlers()
    handler = _EchoHandler()
    handler.setFormatter(_Formatter())
    handler._cgc_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    if quiet:
        level = logging.ERROR
    elif verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1:
        level = logging.INFO
    else:
        level = logging.WARNING
    root.setLevel(level)


def _remove_handlers() -> None:
    root = logging.getLogger("cgc_refine")
    for handler in list(root.handlers):
        if getattr(handler, "_cgc_cli", False):
            root.removeHandler(handler)


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    """Python warnings as one log line (suppressed by -q)."""
    logging.getLogger("cgc_refine.warnings").warning("%s (%s)", message, category.__name__)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


#: Without a terminal, progress is a line on stderr at every tenth of the training and at
#: least this often (seconds); inference windows get the time-based lines only.
PROGRESS_LOG_SECONDS = 30.0


def _duration(seconds: float) -> str:
    """``12.3 s``, ``2 min 05 s`` or ``1 h 02 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class _LogProgress:
    """Progress as occasional log lines on stderr, for runs without a terminal (a batch job,
    a pipe, a CI log): a line whenever another tenth of the work is done (when
    ``every_tenth``) or ``every_s`` seconds have passed since the last line, with the ETA
    from the rate since the first update.

    Parameters
    ----------
    label : str
        What progresses (``"training"``, ``"inference"``).
    unit : str
        What is counted (``"iteration"``, ``"window"``).
    every_tenth : bool
        Also report every tenth of ``total``.
    every_s : float
        Longest silence between two lines, in seconds.
    clock : callable
        Monotonic time in seconds (a parameter for tests).
    """

    def __init__(self, label: str, unit: str, *, every_tenth: bool = True,
                 every_s: float = PROGRESS_LOG_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.unit = label, unit
        self.every_tenth, self.every_s, self.clock = every_tenth, every_s, clock
        self.round = 1
        self._reset()

    def _reset(self) -> None:
        self._first: tuple[int, float] | None = None
        self._last_done = -1
        self._last_line = 0.0
        self._tenth = 0

    def update(self, done: int, total: int, extra: str = "") -> None:
        """Record that ``done`` of ``total`` units are finished; maybe write a line."""
        done, total = int(done), max(int(total), 1)
        now = self.clock()
        if done < self._last_done:  # a new self-training round starts again at 1
            self.round += 1
            self._reset()
        if self._first is None:
            self._first = (done, now)
            self._last_line = now
        self._last_done = done
        tenth = min(10, done * 10 // total)
        due = (self.every_tenth and tenth > self._tenth) or now - self._last_line >= self.every_s
        if done >= total and not self.every_tenth:
            due = False  # inference: the result line follows at once
        if not due:
            return
        self._tenth, self._last_line = tenth, now
        first_done, first_time = self._first
        eta = ""
        if done > first_done and done < total:
            rate = (now - first_time) / (done - first_done)
            eta = f", ETA {_duration(rate * (total - done))}"
        elapsed = f", {_duration(now - first_time)} elapsed" if done > first_done else ""
        round_text = f" (round {self.round})" if self.round > 1 else ""
        click.echo(f"{PROG}: {self.label}{round_text}: {self.unit} {done}/{total} "
                   f"({100 * done // total}%){extra}{elapsed}{eta}", err=True)


class _Progress:
    """Progress of training steps and inference windows on stderr: bars on a terminal, log
    lines (:class:`_LogProgress`) otherwise, nothing with ``-q``."""

    def __init__(self, enabled: bool, log: bool = False) -> None:
        self.enabled = enabled
        self.log = log and not enabled
        self._stack = contextlib.ExitStack()
        self._bar: Any = None
        self._done = 0

    def _open(self, length: int, label: str) -> None:
        self.close()
        self._bar = self._stack.enter_context(
            click.progressbar(length=max(int(length), 1), label=label, file=sys.stderr,
                              show_eta=True, show_percent=True)
        )
        self._done = 0

    def training(self, total: int) -> Callable[[dict[str, float]], None] | None:
        """A Refiner ``callback`` that advances a bar by one step per call (or logs)."""
        if self.log:
            lines = _LogProgress("training", "iteration")

            def log_callback(values: dict[str, float]) -> None:
                loss = values.get("total")
                lines.update(int(values.get("iteration", 0)), total,
                             "" if loss is None else f", loss {loss:.4f}")

            return log_callback
        if not self.enabled:
            return None

        def callback(values: dict[str, float]) -> None:
            if self._bar is None:
                self._open(total, "training ")
            self._bar.update(1)

        return callback

    def inference(self) -> Callable[[int, int], None] | None:
        """A ``progress(done, total)`` function for sliding-window inference."""
        if self.log:
            return _LogProgress("inference", "window", every_tenth=False).update
        if not self.enabled:
            return None
        self.close()
        started = {"open": False}

        def progress(done: int, total: int) -> None:
            if not started["open"]:
                self._open(total, "inference")
                started["open"] = True
            step = int(done) - self._done
            if step > 0:
                self._bar.update(step)
                self._done = int(done)

        return progress

    def close(self) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._bar = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _progress(quiet: bool) -> _Progress:
    tty = _stderr_is_tty()
    return _Progress(enabled=not quiet and tty, log=not quiet and not tty)


def _say(quiet: bool, message: str) -> None:
    """A result line on stdout (hidden by -q)."""
    if not quiet:
        click.echo(message)


# --------------------------------------------------------------------------------------------
# Paths and atomic writes
# --------------------------------------------------------------------------------------------


def _is_nifti_name(path: Path) -> bool:
    lower = path.name.lower()
    return any(lower.endswith(s) and len(lower) > len(s) for s in (".nii.gz", ".nii"))


def _strip_nifti(name: str) -> tuple[str, str]:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return name, ""


def _sidecar_for(path: Path) -> Path:
    """``<stem>.json`` next to a NIfTI file or a model file."""
    stem, ext = _strip_nifti(path.name)
    if not ext:
        stem = path.stem if path.suffix else path.name
    return path.with_name(stem + ".json")


def _probseg_for(mask_path: Path) -> Path:
    stem, ext = _strip_nifti(mask_path.name)
    ext = ext or ".nii.gz"
    if stem.endswith("_mask"):
        stem = stem[: -len("_mask")] + "_probseg"
    else:
        stem = stem + "_probseg"
    return mask_path.with_name(stem + ext)


def _resolve_output(image: Path, output: str | None, suffix: str) -> Path:
    """The output NIfTI for ``image``: next to it, the file ``output``, or inside folder ``output``."""
    from .io import default_output_path

    if output is None:
        return default_output_path(image, suffix)
    out = Path(output)
    if _is_nifti_name(out) and not out.is_dir():
        return out
    if out.exists() and not out.is_dir():
        raise OutputNotWritableError(
            f"output '{out}' is neither a folder nor a .nii/.nii.gz file name; pass an existing "
            "folder or a file name ending in .nii.gz"
        )
    if not out.is_dir():
        raise OutputNotWritableError(
            f"output folder '{out}' does not exist; create it first (mkdir -p '{out}') or pass "
            "a file name ending in .nii.gz"
        )
    return default_output_path(image, suffix, out_dir=out)


def _check_plain_output(path: Path, *, overwrite: bool, what: str = "output") -> Path:
    """Like :func:`cgc_refine.io.check_output_path` for non-NIfTI files (JSON, CSV, models)."""
    from ._utils import check_writable_target

    return check_writable_target(path, overwrite, what=what)


def _check_outputs(
    nifti: Sequence[Path], plain: Sequence[tuple[Path, str]], inputs: Sequence[Path], overwrite: bool
) -> None:
    """Check every output before any compute: writable, not existing, distinct, not an input."""
    from .io import check_output_path

    every = list(nifti) + [p for p, _ in plain]
    resolved_inputs = {_real(p) for p in inputs}
    seen: dict[Path, Path] = {}
    for path in every:
        key = _real(path)
        if key in resolved_inputs:
            raise OutputNotWritableError(
                f"output '{path}' is one of the input files; choose another output path (-o)"
            )
        if key in seen:
            raise OutputNotWritableError(
                f"two outputs would be written to '{path}'; choose another output path (-o)"
            )
        seen[key] = path
    for path in nifti:
        check_output_path(path, overwrite=overwrite)
    for path, what in plain:
        _check_plain_output(path, overwrite=overwrite, what=what)


def _real(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except OSError:
        return Path(os.path.abspath(path))


def _atomic_write_text(path: Path, text: str, *, overwrite: bool) -> Path:
    """Write ``text`` through a hidden temporary file in the same folder, then rename."""
    from ._utils import atomic_write

    return atomic_write(path, lambda handle: handle.write(text), overwrite=overwrite, binary=False)


def _dump_json(payload: dict[str, Any]) -> str:
    import json

    from ._utils import jsonable

    return json.dumps(jsonable(payload, strict=True), indent=2, allow_nan=False) + "\n"


class _Transaction:
    """Outputs of one command, all or nothing.

    Inside :func:`_transaction` the writers leave hidden temporary files with ``outputs``
    (a :class:`cgc_refine._utils.OutputSet`); they replace the previous outputs together, under
    a lock, only once every file is written. ``written`` lists the outputs for the messages.
    """

    def __init__(self, overwrite: bool) -> None:
        from ._utils import OutputSet

        self.overwrite = overwrite
        self.written: list[Path] = []
        self.outputs = OutputSet(overwrite)
        self._in_place: list[Path] = []  # written directly by a writer that does not stage

    def add(self, path: Path) -> Path:
        self.written.append(Path(path))
        if Path(path) not in self.outputs.destinations:
            self._in_place.append(Path(path))
        return Path(path)

    def rollback(self) -> None:
        """Remove the temporaries, and any file a writer wrote in place instead of staging it."""
        self.outputs.discard()
        for path in reversed(self._in_place):
            with contextlib.suppress(OSError):
                path.unlink()
        self.written, self._in_place = [], []


@contextlib.contextmanager
def _transaction(overwrite: bool) -> Iterator[_Transaction]:
    """Collect the outputs written in the block; commit them together when it ends without error."""
    tx = _Transaction(overwrite)
    try:
        with tx.outputs.collect():
            yield tx
        tx.outputs.commit()  # on failure it restores the previous outputs itself
    except BaseException:
        tx.rollback()
        raise


def _abs(path: Any) -> str | None:
    return None if path is None else os.path.abspath(os.fspath(path))


def _sidecar_base(command: str) -> dict[str, Any]:
    import datetime
    import platform

    return {
        "cgc_refine_version": __version__,
        "command": command,
        "command_line": [PROG, *_STATE.get("argv", [])],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# Reports (--report) and scoring against ground truth (--truth)
# --------------------------------------------------------------------------------------------

CT_WINDOW = (0.0, 80.0)  # brain window (HU) of the report montage for --modality ct


def _report_paths(mask_path: Path) -> tuple[Path, Path]:
    """``<mask stem>_report.png`` and ``<mask stem>_report.html`` next to the mask."""
    stem, _ = _strip_nifti(mask_path.name)
    return mask_path.with_name(stem + "_report.png"), mask_path.with_name(stem + "_report.html")


def _require_report() -> None:
    """Fail fast (before any compute) when --report cannot be drawn: matplotlib is missing."""
    from .report import require_matplotlib

    require_matplotlib("--report")


def _load_truth(path: str, volume: Any) -> Any:
    """The ground-truth mask (every value > 0, as ``evaluate``) on the image grid."""
    from .io import load_array

    with _dropping("cgc_refine.io", "is constant", "holds no voxel"):  # an empty truth is valid
        data, _ = load_array(Path(path), reference=volume, name="truth", error=InvalidImageError)
    return data > 0


def _score(mask: Any, truth: Any, spacing: Sequence[float]) -> dict[str, float]:
    from .metrics import evaluate

    return {k: float(v) for k, v in evaluate(mask, truth, spacing=spacing).items()}


def _report_numbers(
    *, volume: Any, refined: Any, prior: Any | None, truth: Any | None,
    scores: dict[str, float] | None, prior_scores: dict[str, float] | None,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The table of the HTML report: volumes (ml), metrics against the truth, settings."""
    import numpy as np

    voxel_ml = float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    numbers: dict[str, Any] = {
        "voxel size (mm)": " x ".join(f"{s:.3g}" for s in volume.spacing),
        "grid (voxels)": " x ".join(str(s) for s in volume.shape),
    }
    if prior is not None:
        numbers["prior lesion volume (ml, p >= 0.5)"] = int((prior >= 0.5).sum()) * voxel_ml
    numbers["refined lesion volume (ml)"] = int(refined.sum()) * voxel_ml
    numbers["refined lesion voxels"] = int(refined.sum())
    if truth is not None and scores is not None:
        numbers["ground-truth lesion volume (ml)"] = int(truth.sum()) * voxel_ml
        numbers["Dice (refined)"] = scores["dice"]
        numbers["sensitivity (refined)"] = scores["sensitivity"]
        numbers["precision (refined)"] = scores["precision"]
        numbers["HD95 (refined, mm)"] = scores["hd95"]
        if prior_scores is not None:
            numbers["Dice (prior)"] = prior_scores["dice"]
            numbers["sensitivity (prior)"] = prior_scores["sensitivity"]
            numbers["precision (prior)"] = prior_scores["precision"]
            numbers["HD95 (prior, mm)"] = prior_scores["hd95"]
    numbers.update(settings)
    return numbers


def _write_report(
    tx: _Transaction, report: dict[str, Any], *, volume: Any, refined: Any, sidecar: dict[str, Any],
    overwrite: bool,
) -> None:
    """Draw the montage and write the HTML page next to it (inside the output transaction)."""
    from .report import render_montage, write_html_report

    png, page = report["png"], report["html"]
    window = CT_WINDOW if report.get("modality") == "ct" else None
    tx.add(render_montage(volume, png, prior=report.get("prior"), refined=refined,
                          truth=report.get("truth"), spacing=volume.spacing, title=report["title"],
                          window=window, overwrite=overwrite))
    shown = {k: v for k, v in sidecar.items() if k not in ("training", "timings")}
    if "training" in sidecar:  # the per-step history would swamp the page
        shown["training"] = {k: v for k, v in sidecar["training"].items() if k != "history"}
    tx.add(write_html_report(page, title=report["title"], numbers=report["numbers"],
                             image_name=png.name, sidecar=shown, overwrite=overwrite))


# --------------------------------------------------------------------------------------------
# Loading and checking inputs
# --------------------------------------------------------------------------------------------


class _DropMessages(logging.Filter):
    """Drop log records that an error raised right after says better."""

    def __init__(self, phrases: Sequence[str]) -> None:
        super().__init__()
        self.phrases = tuple(phrases)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(phrase in message for phrase in self.phrases)


@contextlib.contextmanager
def _dropping(logger_name: str, *phrases: str) -> Iterator[None]:
    target = logging.getLogger(logger_name)
    dropper = _DropMessages(phrases)
    target.addFilter(dropper)
    try:
        yield
    finally:
        target.removeFilter(dropper)


def _load_image(paths: Sequence[str]) -> Any:
    """Read the image(s) as one Volume and refuse a constant channel."""
    from .io import load_volume

    with _dropping("cgc_refine.io", "is constant"):  # an error below says it
        volume = load_volume([Path(p) for p in paths], name="image")
    for index, channel in enumerate(volume.data):
        low, high = float(channel.min()), float(channel.max())
        if low == high:
            raise InvalidImageError(
                f"image file '{volume.paths[index]}' is constant (every voxel is {low:g}): it "
                "holds no contrast to segment; check that the right file was passed"
            )
    return volume


def _brain_mask(path: str | None, volume: Any, modality: str) -> Any:
    """The given brain mask (checked against the image grid, not empty) or a derived one."""
    from .brain import derive_brain_mask
    from .io import load_mask

    if path is None:
        return derive_brain_mask(volume.data, modality=modality)  # type: ignore[arg-type]
    with _dropping("cgc_refine.io", "holds no voxel above 0.5"):  # the error below says it
        mask = load_mask(Path(path), reference=volume, name="brain mask")
    if not mask.any():
        raise EmptyMaskError(
            f"brain mask file '{path}' is empty (no voxel above 0.5); pass this image's brain "
            "mask, or omit --brain-mask to derive one from the image"
        )
    return mask


def _builtin_prior_object(name: str, modality: str, device: Any) -> Any:
    from .priors import make_prior

    # make_prior drops the options a prior does not take (device is Mumford-Shah's only)
    options: dict[str, Any] = {"modality": modality, "device": str(device)}
    return make_prior(name, **options)


def _external_prior(
    path: str, volume: Any, brain: Any, kind: str, resample: bool, on_image_grid: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Read a prior file through the adapters, optionally resampled onto the image grid (or,
    with ``on_image_grid``, taken as on the image's voxel grid despite its affine)."""
    from .priors import FilePrior

    prior = FilePrior(path, kind=kind, resample=resample,
                      on_image_grid=on_image_grid).compute(volume, brain)
    return prior, {"name": "file", **prior.params["file"]}


def _make_prior(
    prior: str, volume: Any, brain: Any, *, kind: str, resample: bool, modality: str, device: Any,
    on_image_grid: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """The prior probability map of one subject and its provenance."""
    if prior in BUILTIN_PRIORS:
        if kind != "auto":
            logger.warning("--prior-kind %s is ignored for the built-in prior %s", kind, prior)
        from .priors import resolve_prior_name

        pmap = _builtin_prior_object(prior, modality, device).compute(volume, brain)
        return pmap, {"name": prior, "resolved_name": resolve_prior_name(prior, modality),
                      "kind_requested": None, "resampled": False}
    return _external_prior(prior, volume, brain, kind, resample, on_image_grid)


def _check_images_and_prior(images: Sequence[Path], prior: Path | None) -> None:
    """Fail at once (before any warning or compute) on a missing image, and refuse an image
    passed as its own prior (the same file, or a copy with identical bytes)."""
    from .io import check_input_file, same_file_or_content

    for image in images:
        check_input_file(image, name="image", error=InvalidImageError)
    if prior is None or not prior.is_file():
        return
    for image in images:
        if same_file_or_content(prior, image):
            raise InvalidPriorError(
                f"the prior '{prior}' is the image '{image}' itself (the same file or identical "
                "bytes); a prior is a lesion map of that image (probabilities, a mask, labels "
                "or anomaly scores): pass such a map, or a built-in prior such as --prior gmm"
            )


def _diagnostics_line(diagnostics: dict[str, Any]) -> str:
    """The label-free prior summary for the result lines."""
    from .priors.diagnostics import diagnostics_summary

    return diagnostics_summary(diagnostics)


def _prior_reading(params: dict[str, Any]) -> str:
    """`` (read as percent)`` for a prior file whose kind was inferred from its values, so the
    result line says how it was read (the adapters' warning gives the reason); else ``""``."""
    kind = params.get("kind_inferred")
    return f" (read as {kind})" if kind else ""


def _prior_argument(prior: str) -> str:
    """Validate ``--prior``: a built-in name or something that looks like a NIfTI file."""
    if prior in BUILTIN_PRIORS:
        return prior
    path = Path(prior)
    if not path.exists() and not _is_nifti_name(path) and os.sep not in prior:
        raise InvalidPriorError(
            f"--prior {prior!r} is neither a built-in prior ({', '.join(BUILTIN_PRIORS)}) nor "
            f"an existing file; pass {', '.join(BUILTIN_PRIORS)} or the path of a .nii.gz prior map"
        )
    return prior


# --------------------------------------------------------------------------------------------
# Configuration and device
# --------------------------------------------------------------------------------------------


def _window_size(refiner: Any) -> list[int]:
    """The sliding-window size of a fitted refiner (the crop for older models)."""
    return [int(v) for v in getattr(refiner, "window_size_", refiner.crop_size_)]


def _build_config(
    *, fast: bool, iterations: int | None, threshold: float | None, min_size_mm3: float | None,
    crop_size: Sequence[int] | None, workers: int = 0, cleanup: str | None = None,
    rounds: int | None = None, tta: str | int | None = None,
) -> Any:
    from .config import RefinerConfig

    overrides: dict[str, Any] = {"num_workers": int(workers)}
    if cleanup is not None:
        overrides["cleanup"] = cleanup
    if rounds is not None:
        overrides["rounds"] = int(rounds)
    if tta is not None:
        overrides["tta"] = int(tta)
    if iterations is not None:
        overrides["iterations"] = int(iterations)
    if threshold is not None:
        overrides["threshold"] = float(threshold)
    if min_size_mm3 is not None:
        overrides["min_size_mm3"] = float(min_size_mm3)
    if crop_size:
        overrides["crop_size"] = tuple(int(c) for c in crop_size)
    config = RefinerConfig.fast(**overrides) if fast else RefinerConfig(**overrides)
    return config.validate()


def _resolve_device(device: str, *, fast: bool | None = None) -> Any:
    from .device import resolve_device

    resolved = resolve_device(device)
    if fast is False and resolved.type == "cpu":
        logger.warning(
            "training the full configuration on the CPU is slow; add --fast for a reduced "
            "network (or use a GPU with --device cuda)"
        )
    return resolved


# --------------------------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------------------------


def _common_options(*, output_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """-o, --overwrite, -q, -v: the same meaning on every command."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option("-v", "--verbose", count=True,
                            help="More messages (-v: progress information, -vv: debugging).")(func)
        func = click.option("-q", "--quiet", is_flag=True,
                            help="Only errors; no progress bar, no result lines.")(func)
        func = click.option("--overwrite", is_flag=True, help="Replace existing output files.")(func)
        func = click.option("-o", "--output", type=str, default=None, metavar="PATH",
                            help=output_help)(func)
        return func

    return decorate


def _device_option(func: Callable[..., Any]) -> Callable[..., Any]:
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


def _configure_threads(threads: int | None) -> int:
    """Set torch's CPU thread count (see :func:`cgc_refine.device.configure_threads`)."""
    from .device import configure_threads

    return configure_threads(threads)


def _postprocess_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--min-size-mm3", type=click.FloatRange(min=0.0), default=None,
                        help="Remove lesion components smaller than this (mm^3; default: the "
                             "configuration's, 0).")(func)
    func = click.option("--threshold", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
                        default=None, help="Probability threshold of the mask (default 0.5).")(func)
    return func


def _training_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--crop-size", type=click.IntRange(min=1), nargs=3, default=None,
                        hidden=True, help="Advanced: training crop size (voxels).")(func)
    func = click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
                        help="Random seed, 0 to 2**32-1 (weights, crops, flips).")(func)
    func = click.option("--iterations", type=click.IntRange(min=1), default=None,
                        help="Training iterations (default: the --fast configuration's, else "
                             "the paper's 2000).")(func)
    func = click.option("--fast", is_flag=True,
                        help="Reduced network and crops that train in minutes on a CPU.")(func)
    func = _postprocess_options(func)
    func = _device_option(func)
    return func


def _recipe_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The label-free refinement recipe's settings (RefinerConfig.cleanup, rounds, tta)."""

    func = click.option("--tta", type=click.Choice(["1", "2", "4", "8"]), default=None,
                        help="Flipped copies averaged at inference (default: 2 with --fast, else 8).")(func)
    func = click.option("--rounds", type=click.IntRange(1, 10), default=None,
                        help="Self-training rounds (default 1): round r learns from round r-1's "
                             "cleaned prediction.")(func)
    func = click.option("--cleanup", type=click.Choice(LESION_PATTERNS), default=None,
                        help="Label-free clean-up of the prior and of the refined mask, by lesion "
                             "pattern: focal (one mass: tumour, stroke), multifocal (many foci: MS, "
                             "WMH), auto (decided from the prior; default) or none.")(func)
    return func


def _modality_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--modality", type=click.Choice(["mri", "ct"]), default="mri",
                        show_default=True,
                        help="mri: skull-stripped MRI (FLAIR first); ct: head CT in HU.")(func)


def _report_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--report", is_flag=True,
        help="Also write <mask stem>_report.png (slices with prior/refined/truth contours) and "
             "<mask stem>_report.html next to the mask; needs matplotlib "
             '(pip install "cgc_refine[report]").',
    )(func)


def _truth_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--truth", default=None, metavar="MASK",
        help="Ground-truth lesion mask on the image grid (values > 0): Dice, sensitivity, "
             "precision and HD95 go to the sidecar and, with --report, its contour to the report.",
    )(func)


# --------------------------------------------------------------------------------------------
# The group: error handling around everything
# --------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    click.echo(f"{PROG}: error: {_one_line(message)}", err=True)


def _interrupted() -> None:
    """The interrupt line; it names a training checkpoint kept for ``fit --resume``."""
    kept = _STATE.get("checkpoint")
    if kept is not None and Path(kept).is_file():
        click.echo(f"{PROG}: interrupted; no output was written except the training checkpoint "
                   f"'{kept}', kept so that the same fit command with --resume continues from it",
                   err=True)
        return
    click.echo(f"{PROG}: interrupted; no output was written", err=True)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``), delivered as an interrupt so the same clean-up runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _catch_sigterm() -> Any:
    """Route SIGTERM through the interrupt path (main thread only); return the old handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


class _CLIGroup(click.Group):
    """A group whose ``main`` turns every failure into one line and a meaningful exit code."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        _STATE.update(verbose=_count_verbose(argv), argv=argv, quiet=False, checkpoint=None)
        code = 0
        previous_sigterm = _catch_sigterm()
        try:
            from ._utils import overwrite_wording

            with warnings.catch_warnings(), overwrite_wording("add --overwrite"):
                warnings.showwarning = _show_warning
                result = super().main(
                    args=argv, prog_name=prog_name or PROG, complete_var=complete_var,
                    standalone_mode=False, **extra,
                )
            code = result if isinstance(result, int) and not isinstance(result, bool) else 0
        except click.exceptions.Abort as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, KeyboardInterrupt):
                _interrupted()
                code = EXIT_TERMINATED if isinstance(cause, _Terminated) else EXIT_INTERRUPTED
            else:
                _error("aborted")
                code = EXIT_UNEXPECTED
        except KeyboardInterrupt as exc:
            _interrupted()
            code = EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except BrokenPipeError:  # e.g. "cgc-refine evaluate ... | head": nothing left to say
            with contextlib.suppress(Exception):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the final flush
            code = EXIT_UNEXPECTED
        except click.ClickException as exc:
            message = exc.format_message()
            if isinstance(exc, click.UsageError):
                path = exc.ctx.command_path if exc.ctx is not None else PROG
                message = f"{message} (see '{path} --help')"
            _error(message)
            code = EXIT_ERROR
        except CGCRefineError as exc:
            if _STATE["verbose"] >= 2:
                traceback.print_exc(file=sys.stderr)
            _error(str(exc) or type(exc).__name__)
            code = EXIT_ERROR
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _STATE["verbose"]:
                traceback.print_exc(file=sys.stderr)
                hint = ""
            else:
                hint = " (run again with -v for the traceback)"
            _error(f"unexpected {type(exc).__name__}: {_one_line(str(exc))}{hint}")
            code = EXIT_UNEXPECTED
        finally:
            _remove_handlers()
            _restore_sigterm(previous_sigterm)
        if standalone_mode:
            sys.exit(code)
        return code


def _count_verbose(argv: Sequence[str]) -> int:
    count = 0
    for arg in argv:
        if arg == "--":
            break
        if arg == "--verbose":
            count += 1
        elif arg.startswith("-") and not arg.startswith("--") and set(arg[1:]) == {"v"}:
            count += len(arg) - 1
    return count


# --------------------------------------------------------------------------------------------
# Single subject (the group itself)
# --------------------------------------------------------------------------------------------


@click.group(
    cls=_CLIGroup,
    name=PROG,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name=PROG, message="%(prog)s %(version)s")
@click.option("--prior", "prior", metavar="PRIOR",
              help="A prior map (.nii/.nii.gz) or a built-in prior: " + ", ".join(BUILTIN_PRIORS)
                   + " (auto: the default prior).")
@click.option("--image", "images", multiple=True, metavar="IMG",
              help="Image file; repeat for several modalities, the lesion-bright one (FLAIR/CT) first.")
@click.option("--brain-mask", default=None, metavar="MASK",
              help="Brain mask on the image grid (default: derived from the image).")
@click.option("--prior-kind", type=click.Choice(PRIOR_KINDS), default="auto", show_default=True,
              help="How to read a prior file (auto infers it from the values).")
@_modality_option
@click.option("--resample-prior", is_flag=True,
              help="Resample a prior on another grid onto the image grid (linear; nearest for "
                   "masks and labels).")
@click.option("--prior-on-image-grid", is_flag=True,
              help="Take a prior file with the image's shape but another affine (a lost header) "
                   "as being on the image's voxel grid, ignoring its affine.")
@click.option("--save-proba", is_flag=True,
              help="Also write the refined probability map (<stem>_label-lesion_probseg.nii.gz).")
@click.option("--save-model", default=None, metavar="PATH", help="Also save the trained model.")
@_truth_option
@_report_option
@_recipe_options
@_training_options
@_common_options(output_help="Output mask file (.nii.gz) or folder (default: next to the image).")
@click.pass_context
def main(ctx: click.Context, **options: Any) -> None:
    """Refine a lesion prior into a lesion mask with a CGC-regularised 3D U-Net.

    \b
    Single subject:
      cgc-refine --prior gmm --image sub-01_FLAIR.nii.gz
      cgc-refine --prior vae_scores.nii.gz --prior-kind scores --image FLAIR.nii.gz --fast
    See the subcommands below for priors, cohorts, saved models, evaluation and a demo.
    """
    if ctx.invoked_subcommand is not None:
        _configure_logging(options["quiet"], options["verbose"])
        shared = ("quiet", "verbose", "overwrite")
        given = [
            param.opts[-1] if param.opts else param.name
            for param in ctx.command.params
            if param.name in options and param.name not in shared
            and ctx.get_parameter_source(param.name) != click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(sorted(given))} belong(s) to the single-subject form; put "
                f"subcommand options after '{ctx.invoked_subcommand}' or drop the subcommand",
                ctx=ctx,
            )
        ctx.obj = {"quiet": options["quiet"], "verbose": options["verbose"],
                   "overwrite": options["overwrite"]}
        return
    if not any(v for k, v in options.items() if k not in ("prior_kind", "modality", "device", "seed")):
        click.echo(ctx.get_help())
        ctx.exit(0)
    if not options["prior"]:
        raise click.UsageError("missing option --prior (a prior file or a built-in prior, e.g. auto)", ctx=ctx)
    if not options["images"]:
        raise click.UsageError("missing option --image (the lesion-bright image first)", ctx=ctx)
    _configure_logging(options["quiet"], options["verbose"])
    _run_single(**options)


def _run_single(
    *, prior: str, images: Sequence[str], brain_mask: str | None, prior_kind: str, modality: str,
    resample_prior: bool, save_proba: bool, save_model: str | None, device: str, threshold: float | None,
    min_size_mm3: float | None, fast: bool, iterations: int | None, seed: int,
    crop_size: Sequence[int] | None, truth: str | None, report: bool, output: str | None,
    overwrite: bool, quiet: bool, verbose: int, threads: int | None = None,
    prior_on_image_grid: bool = False, cleanup: str | None = None, rounds: int | None = None,
    tta: str | None = None,
) -> None:
    started = time.perf_counter()
    prior = _prior_argument(prior)
    image_paths = [Path(p) for p in images]
    mask_path = _resolve_output(image_paths[0], output, MASK_SUFFIX)
    proba_path = _probseg_for(mask_path) if save_proba else None
    sidecar_path = _sidecar_for(mask_path)
    model_path = Path(save_model) if save_model else None
    report_png, report_html = _report_paths(mask_path)
    if report:
        _require_report()
    inputs = [*image_paths, *([Path(prior)] if prior not in BUILTIN_PRIORS else [])]
    if brain_mask:
        inputs.append(Path(brain_mask))
    if truth:
        inputs.append(Path(truth))
    plain = [(sidecar_path, "sidecar")] + ([(model_path, "model")] if model_path else [])
    if report:
        plain += [(report_png, "report image"), (report_html, "report page")]
    _check_outputs([mask_path] + ([proba_path] if proba_path else []), plain, inputs, overwrite)
    _check_images_and_prior(image_paths, None if prior in BUILTIN_PRIORS else Path(prior))
    config = _build_config(fast=fast, iterations=iterations, threshold=threshold,
                           min_size_mm3=min_size_mm3, crop_size=crop_size, cleanup=cleanup,
                           rounds=rounds, tta=tta)
    resolved = _resolve_device(device, fast=fast)
    n_threads = _configure_threads(threads)

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    volume = _load_image(image_paths)
    brain = _brain_mask(brain_mask, volume, modality)
    truth_mask = _load_truth(truth, volume) if truth else None
    timings["load_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    pmap, prior_info = _make_prior(prior, volume, brain, kind=prior_kind, resample=resample_prior,
                                   modality=modality, device=resolved,
                                   on_image_grid=prior_on_image_grid)
    from .priors import check_prior_informative, prior_diagnostics

    check_prior_informative(pmap, brain)
    timings["prior_s"] = time.perf_counter() - tick
    prior_diag = prior_diagnostics(pmap, brain, volume.spacing)
    _say(quiet, f"prior{_prior_reading(pmap.params)}: {_diagnostics_line(prior_diag)}")

    from .refiner import Refiner

    with _progress(quiet) as bars:
        refiner = Refiner([pmap], config=config, prior_kind="auto", modality=modality,
                          device=str(resolved), random_state=seed,
                          callback=bars.training(config.iterations))
        tick = time.perf_counter()
        refiner.fit([volume], brain_masks=[brain])
        timings["train_s"] = time.perf_counter() - tick
        from .distributed import is_main_process

        if not is_main_process():
            return  # under torchrun only rank 0 predicts and writes
        tick = time.perf_counter()
        probability = refiner.predict_proba(volume, brain, prior=pmap, progress=bars.inference())
        mask = refiner.postprocess(probability, volume.spacing, affine=volume.affine, brain_mask=brain)
        timings["inference_s"] = time.perf_counter() - tick

    import numpy as np

    from .cleanup import CleanupSettings, clean_probability

    refinement = _refinement_facts(refiner, config, pmap.data, probability, mask, volume, brain)
    # the guard compares with the cleaned prior the output was blended with (the prior itself
    # when there was no blend or no clean-up)
    reference = getattr(refiner, "blend_reference_", None)
    if reference is None and config.cleanup != "none":
        reference = clean_probability(pmap.data, volume.spacing, CleanupSettings(pattern=config.cleanup),
                                      brain_mask=brain, affine=volume.affine).probability
    if reference is None:
        reference = pmap.data
    mask, guard_message = refiner.guard(mask, (reference >= 0.5).astype(np.uint8))
    refinement["guard"] = guard_message

    n_voxels = int(mask.sum())
    voxel_mm3 = float(abs(np.linalg.det(volume.affine[:3, :3])))
    sidecar = _sidecar_base("segment")
    sidecar.update({
        "inputs": {"images": [_abs(p) for p in image_paths], "prior": prior_info.get("path", prior),
                   "brain_mask": _abs(brain_mask) if brain_mask else "derived"},
        "outputs": {"mask": _abs(mask_path), "probability": _abs(proba_path), "model": _abs(model_path)},
        "prior": {**prior_info, "kind": pmap.source, "params": pmap.params,
                  "foreground_voxels": int((pmap.data[brain] >= 0.5).sum()),
                  "diagnostics": prior_diag},
        "modality": modality,
        "seed": seed,
        "device": str(refiner.device_),
        "threads": n_threads,
        "threshold": float(config.threshold),
        "min_size_mm3": float(config.min_size_mm3),
        "config": config.to_dict(),
        "training": {"n_iter": int(refiner.n_iter_), "crop_size": list(refiner.crop_size_),
                     "window_size": _window_size(refiner), "history": refiner.history_},
        "lesion": {"voxels": n_voxels, "volume_mm3": n_voxels * voxel_mm3},
        "refinement": refinement,
        "timings": timings,
    })
    prior_voxels = sidecar["prior"]["foreground_voxels"]
    sidecar["lesion"]["fraction_of_prior"] = n_voxels / prior_voxels if prior_voxels else None
    change = volume_change_warning(prior_voxels, n_voxels)
    if change:
        logger.warning(change)
    scores = prior_scores = None
    if truth_mask is not None:
        scores = _score(mask, truth_mask, volume.spacing)
        prior_scores = _score(pmap.data >= 0.5, truth_mask, volume.spacing)
        sidecar["inputs"]["truth"] = _abs(truth)
        sidecar["evaluation"] = {"refined": scores, "prior": prior_scores}
        _say(quiet, f"Dice against the truth: prior {_dice_text(prior_scores)}, "
                    f"refined {_dice_text(scores)}")
    report_spec = None
    if report:
        sidecar["outputs"].update(report_png=_abs(report_png), report_html=_abs(report_html))
        prior_name = prior if prior in BUILTIN_PRIORS else Path(prior).name
        report_spec = {
            "png": report_png, "html": report_html, "prior": pmap.data, "truth": truth_mask,
            "modality": modality, "title": f"{image_paths[0].name}: refined lesion mask (prior: {prior_name})",
            "numbers": _report_numbers(
                volume=volume, refined=mask, prior=pmap.data, truth=truth_mask, scores=scores,
                prior_scores=prior_scores,
                settings={"image": image_paths[0].name, "prior": prior_name, "modality": modality,
                          "configuration": "fast" if fast else "full",
                          "iterations": int(refiner.n_iter_), "threshold": float(config.threshold),
                          "min lesion size (mm^3)": float(config.min_size_mm3), "seed": seed,
                          "device": str(refiner.device_)},
            ),
        }
    _write_results(
        refiner=refiner, volume=volume, mask=mask, probability=probability, mask_path=mask_path,
        proba_path=proba_path, model_path=model_path, sidecar_path=sidecar_path, sidecar=sidecar,
        overwrite=overwrite, started=started, quiet=quiet, report=report_spec,
    )
    _say(quiet, _summary_line(sidecar["lesion"]["volume_mm3"], prior_voxels * voxel_mm3,
                              time.perf_counter() - started))


def _summary_line(lesion_mm3: float, prior_mm3: float | None, seconds: float) -> str:
    """The last line of a single-subject run: lesion volume, change from the prior, time."""
    text = f"done: lesion volume {lesion_mm3 / 1000.0:.2f} ml"
    if prior_mm3 is not None:
        change = (lesion_mm3 - prior_mm3) / 1000.0
        relative = f", {100.0 * change * 1000.0 / prior_mm3:+.0f}%" if prior_mm3 > 0 else ""
        text += f" (prior {prior_mm3 / 1000.0:.2f} ml: {change:+.2f} ml{relative})"
    return f"{text}, in {_duration(seconds)}"


def _refinement_facts(refiner: Any, config: Any, prior: Any, probability: Any, mask: Any, volume: Any,
                      brain: Any) -> dict[str, Any]:
    """Label-free facts of a refinement for the sidecar: clean-up, rounds, TTA, change vs the prior."""
    import numpy as np

    prior_mask = prior >= 0.5
    refined = mask != 0
    total = int(prior_mask.sum()) + int(refined.sum())
    training_cleanup = (getattr(refiner, "target_cleanup_", None) or [None])[0]
    return {
        "recipe": {name: getattr(config, name) for name in (
            "cleanup", "cleanup_output", "target_weighting", "intensity_augmentation", "rounds", "tta",
            "anisotropic", "fallback")},
        "strides": getattr(refiner, "strides_", None),
        "prior_cleanup": training_cleanup,
        "output_cleanup": getattr(refiner, "cleanup_info_", None),
        "rounds": getattr(refiner, "rounds_", []),
        "tta_agreement": getattr(refiner, "tta_agreement_", None),
        "voxels_changed_vs_prior": int((prior_mask != refined).sum()),
        "dice_with_prior": 1.0 if total == 0 else 2.0 * int((prior_mask & refined).sum()) / total,
        "network_voxels": int((getattr(refiner, "network_probability_", probability) >= config.threshold).sum()),
        "blended_voxels_before_cleanup": int((probability >= config.threshold).sum()),
    }


def volume_change_warning(prior_voxels: int, refined_voxels: int) -> str | None:
    """A label-free warning when the refined mask is under half or over twice the prior's size.

    Refinement smooths and completes a prior; it should not remove or add most of it. A large
    change is worth a look: in the reduced configuration, refining a strong external
    segmentation of small lesions lost much of it (benchmarks/RESULTS.md, section 7).
    """
    from .refiner import collapse_warning

    if collapse_warning(prior_voxels, refined_voxels, factor=2.0) is None:
        return None
    ratio = refined_voxels / prior_voxels
    return (f"the refined mask holds {refined_voxels} lesion voxels, {100 * ratio:.0f}% of the prior's "
            f"{prior_voxels}; check it against the image (a strong prior, such as another network's "
            "segmentation, can be better than its refinement)")


def _dice_text(scores: dict[str, float]) -> str:
    """The Dice of ``scores`` for a result line (``nan`` when undefined: both masks empty)."""
    import math

    value = scores["dice"]
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _write_results(
    *, refiner: Any, volume: Any, mask: Any, probability: Any, mask_path: Path,
    proba_path: Path | None, model_path: Path | None, sidecar_path: Path, sidecar: dict[str, Any],
    overwrite: bool, started: float, quiet: bool, report: dict[str, Any] | None = None,
) -> None:
    """Write model, mask, probability map, report and (last) the sidecar; all or nothing."""
    from .io import save_mask, save_probability_map

    tick = time.perf_counter()
    with _transaction(overwrite) as tx:
        if model_path is not None:
            tx.add(refiner.save(model_path, overwrite=overwrite))
        tx.add(save_mask(mask, volume, mask_path, overwrite=overwrite))
        if proba_path is not None:
            tx.add(save_probability_map(probability, volume, proba_path, overwrite=overwrite))
        if report is not None:
            _write_report(tx, report, volume=volume, refined=mask, sidecar=sidecar,
                          overwrite=overwrite)
        sidecar["timings"]["write_s"] = time.perf_counter() - tick
        sidecar["timings"]["total_s"] = time.perf_counter() - started
        tx.add(_atomic_write_text(sidecar_path, _dump_json(sidecar), overwrite=overwrite))
    for path in tx.written:
        _say(quiet, f"wrote {path}")


# --------------------------------------------------------------------------------------------
# prior
# --------------------------------------------------------------------------------------------


def _sub_logging(ctx: click.Context, quiet: bool, verbose: int) -> tuple[bool, int]:
    """Combine the group's -q/-v with the subcommand's and configure logging."""
    parent = ctx.obj or {}
    quiet = quiet or bool(parent.get("quiet"))
    verbose = verbose or int(parent.get("verbose", 0))
    _configure_logging(quiet, verbose)
    return quiet, verbose


@main.command("prior")
@click.argument("name", type=click.Choice(BUILTIN_PRIORS))
@click.option("--image", "images", multiple=True, required=True, metavar="IMG",
              help="Image file; repeat for several modalities, the lesion-bright one first.")
@click.option("--brain-mask", default=None, metavar="MASK", help="Brain mask (default: derived).")
@click.option("--cleanup", type=click.Choice(LESION_PATTERNS), default="none", show_default=True,
              help="Also clean the prior up (closing, hole filling, component filtering) for this lesion "
                   "pattern: focal, multifocal or auto (decided from the prior).")
@_modality_option
@_device_option
@_common_options(output_help="Output prior file (.nii.gz) or folder "
                             "(default: <stem>_label-lesion_desc-NAME_probseg.nii.gz next to the image).")
@click.pass_context
def prior_command(
    ctx: click.Context, name: str, images: Sequence[str], brain_mask: str | None, modality: str,
    device: str, output: str | None, overwrite: bool, quiet: bool, verbose: int,
    threads: int | None = None, cleanup: str = "none",
) -> None:
    """Compute a built-in prior (auto, gmm, outlier, mumford-shah...) and write it as a float32 map."""
    quiet, _ = _sub_logging(ctx, quiet, verbose)
    overwrite = overwrite or bool((ctx.obj or {}).get("overwrite"))
    started = time.perf_counter()
    image_paths = [Path(p) for p in images]
    out_path = _resolve_output(image_paths[0], output, f"label-lesion_desc-{name}_probseg")
    sidecar_path = _sidecar_for(out_path)
    inputs = image_paths + ([Path(brain_mask)] if brain_mask else [])
    _check_outputs([out_path], [(sidecar_path, "sidecar")], inputs, overwrite)
    resolved = _resolve_device(device)
    n_threads = _configure_threads(threads)
    volume = _load_image(image_paths)
    brain = _brain_mask(brain_mask, volume, modality)
    tick = time.perf_counter()
    pmap = _builtin_prior_object(name, modality, resolved).compute(volume, brain)
    cleanup_info = None
    if cleanup != "none":
        from .cleanup import CleanupSettings, clean_probability

        cleaned = clean_probability(pmap.data, volume.spacing, CleanupSettings(pattern=cleanup),
                                    brain_mask=brain, affine=volume.affine)
        cleanup_info = cleaned.info
        pmap = type(pmap)(cleaned.probability, pmap.affine, pmap.source, pmap.params)
        _say(quiet, f"clean-up ({cleanup_info['pattern']}): {cleanup_info['voxels_before']} -> "
                    f"{cleanup_info['voxels_after']} voxels")
    prior_seconds = time.perf_counter() - tick
    from .priors import prior_diagnostics, resolve_prior_name

    # label-free diagnostics; their warnings cover an empty or implausibly large prior
    prior_diag = prior_diagnostics(pmap, brain, volume.spacing)
    resolved_name = resolve_prior_name(name, modality)
    _say(quiet, f"prior {name}{f' ({resolved_name})' if name == 'auto' else ''}: "
                f"{_diagnostics_line(prior_diag)}")
    from .io import save_probability_map

    sidecar = _sidecar_base("prior")
    sidecar.update({
        "inputs": {"images": [_abs(p) for p in image_paths],
                   "brain_mask": _abs(brain_mask) if brain_mask else "derived"},
        "outputs": {"prior": _abs(out_path)},
        "prior": {"name": name, "resolved_name": resolved_name,
                  "kind": pmap.source, "params": pmap.params,
                  "foreground_voxels": int((pmap.data[brain] >= 0.5).sum()),
                  "diagnostics": prior_diag, "cleanup": cleanup_info},
        "modality": modality,
        "device": str(resolved),
        "threads": n_threads,
        "timings": {"prior_s": prior_seconds},
    })
    with _transaction(overwrite) as tx:
        tx.add(save_probability_map(pmap.data, volume, out_path, overwrite=overwrite))
        sidecar["timings"]["total_s"] = time.perf_counter() - started
        tx.add(_atomic_write_text(sidecar_path, _dump_json(sidecar), overwrite=overwrite))
    for path in tx.written:
        _say(quiet, f"wrote {path}")


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


@main.command("fit")
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
@click.option("--prior-kind", type=click.Choice(PRIOR_KINDS), default="auto", show_default=True,
              help="How to read prior files.")
@_modality_option
@click.option("--resample-prior", is_flag=True, help="Resample prior files onto their image grids.")
@click.option("--cache-dir", default=None, metavar="DIR",
              help="Preprocess each subject once into this folder (keyed by the inputs' "
                   "content); training then reads only its crops from disk, and reruns skip "
                   "loading, priors and preprocessing.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data-loader worker processes drawing crops while the step runs.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Write a checkpoint (MODEL.ckpt) every N iterations (0: none); it is kept "
                   "when the fit is interrupted and removed when the fit finishes.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted fit from MODEL.ckpt; give the same options as the "
                   "interrupted command (same cohort, seed and configuration).")
@_recipe_options
@_training_options
@_common_options(output_help="Model file to write (e.g. model.pt); required.")
@click.pass_context
def fit_command(
    ctx: click.Context, cohort: str | None, image_patterns: Sequence[str], prior_pattern: str | None,
    mask_pattern: str | None, csv_file: str | None, prior: str | None, prior_kind: str,
    modality: str, resample_prior: bool, cache_dir: str | None, workers: int, checkpoint_every: int,
    device: str, threshold: float | None, min_size_mm3: float | None, fast: bool,
    iterations: int | None, seed: int, crop_size: Sequence[int] | None, output: str | None,
    overwrite: bool, quiet: bool, verbose: int, threads: int | None = None,
    cleanup: str | None = None, rounds: int | None = None, tta: str | None = None,
    resume: bool = False,
) -> None:
    """Train one model on a cohort (no ground truth used) and save it.

    Under torchrun (e.g. 'torchrun --standalone --nproc_per_node 2 -m cgc_refine fit ...')
    every process trains one replica of a DistributedDataParallel model; only rank 0 writes.
    """
    quiet, _ = _sub_logging(ctx, quiet, verbose)
    overwrite = overwrite or bool((ctx.obj or {}).get("overwrite"))
    started = time.perf_counter()
    if output is None:
        raise click.UsageError("missing option -o/--output (the model file to write)", ctx=ctx)
    if (cohort is None) == (csv_file is None):
        raise click.UsageError("give exactly one of --cohort DIR or --csv FILE", ctx=ctx)
    if cohort is not None and not image_patterns:
        raise click.UsageError("--cohort needs at least one --image-pattern", ctx=ctx)
    if csv_file is not None and (image_patterns or prior_pattern or mask_pattern):
        raise click.UsageError("--image-pattern/--prior-pattern/--mask-pattern go with --cohort, "
                               "not with --csv", ctx=ctx)
    model_path = Path(output)
    if model_path.is_dir():
        raise OutputNotWritableError(
            f"-o '{model_path}' is a folder; fit writes one model file, e.g. -o '{model_path / 'model.pt'}'"
        )
    sidecar_path = _sidecar_for(model_path)
    if sidecar_path == model_path:
        sidecar_path = model_path.with_name(model_path.name + ".json")

    from .cohort import find_subjects, read_subjects_csv

    if cohort is not None:
        subjects = find_subjects(cohort, list(image_patterns), prior=prior_pattern,
                                 brain_mask=mask_pattern)
        where = f"cohort folder '{cohort}' (patterns {list(image_patterns)})"
    else:
        csv_path = Path(csv_file)  # type: ignore[arg-type]
        if not csv_path.is_file():
            raise InvalidImageError(f"subjects CSV '{csv_path}' does not exist; check the path")
        subjects = read_subjects_csv(csv_path)
        where = f"CSV '{csv_path}'"
    if not subjects:
        raise InvalidImageError(f"no subject found in {where}; check the folder and the patterns")
    for subject in subjects:
        if not subject.images:
            raise InvalidImageError(f"subject {subject.name!r} has no image in {where}")
    with_prior = [s for s in subjects if s.prior is not None]
    if with_prior and len(with_prior) != len(subjects):
        missing = [s.name for s in subjects if s.prior is None]
        raise InvalidPriorError(
            f"{len(missing)} subject(s) have no prior file ({', '.join(missing[:5])}); give every "
            "subject a prior, or none and use a built-in --prior (e.g. auto)"
        )
    if with_prior and prior is not None:
        raise click.UsageError("the cohort has prior files; drop --prior or the prior "
                               "pattern/column", ctx=ctx)
    prior_name = None if with_prior else (prior or "gmm")

    inputs = [p for s in subjects for p in (*s.images, s.prior, s.brain_mask) if p is not None]
    _check_outputs([], [(model_path, "model"), (sidecar_path, "sidecar")], inputs, overwrite)
    for subject in subjects:
        _check_images_and_prior(subject.images, subject.prior)
    config = _build_config(fast=fast, iterations=iterations, threshold=threshold,
                           min_size_mm3=min_size_mm3, crop_size=crop_size, workers=workers,
                           cleanup=cleanup, rounds=rounds, tta=tta)
    resolved = _resolve_device(device, fast=fast)
    n_threads = _configure_threads(threads)
    checkpoint_file = model_path.with_name(model_path.name + ".ckpt")
    resume_path = _resume_checkpoint(checkpoint_file, seed=seed, rounds=config.rounds) if resume else None
    if resume_path is None and checkpoint_file.is_file():
        logger.warning("'%s' is left from an earlier interrupted fit; this fit starts afresh (add "
                       "--resume to continue from it) and removes it when it finishes", checkpoint_file)
    checkpoint_path = checkpoint_file if checkpoint_every else None
    if checkpoint_path is not None:
        _check_plain_output(checkpoint_path, overwrite=True, what="checkpoint")
    if checkpoint_path is not None or resume_path is not None:
        _STATE["checkpoint"] = checkpoint_file  # named by the interrupt line

    from .distributed import is_main_process
    from .priors import FilePrior
    from .refiner import Refiner

    if prior_name is not None:
        if prior_kind != "auto":
            logger.warning("--prior-kind %s is ignored for the built-in prior %s", prior_kind, prior_name)
        prior_arg: Any = _builtin_prior_object(prior_name, modality, resolved)
    else:
        prior_arg = [FilePrior(s.prior, kind=prior_kind, resample=resample_prior) for s in subjects]  # type: ignore[arg-type]
    # Subjects are read one at a time inside fit (only the preprocessed arrays are kept; with
    # --cache-dir, not even those).
    volumes = [[str(p) for p in s.images] for s in subjects]
    masks = [None if s.brain_mask is None else str(s.brain_mask) for s in subjects]
    with _progress(quiet) as bars:
        refiner = Refiner(prior_arg, config=config, modality=modality, device=str(resolved),
                          random_state=seed, callback=bars.training(config.iterations))
        tick = time.perf_counter()
        refiner.fit(volumes, brain_masks=masks, cache_dir=cache_dir,
                    checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                    resume_from=resume_path)
        train_seconds = time.perf_counter() - tick
    if not is_main_process():
        return  # under torchrun only rank 0 writes
    n_channels = refiner.n_channels_in_
    prior_seconds = float(refiner.timings_["priors_s"])
    records = []
    for subject, provenance in zip(subjects, refiner.priors_):
        params = dict(provenance.get("params") or {})
        file_record = params.pop("file", None)
        prior_record = ({"name": "file", **file_record} if file_record else
                        {"name": prior_name, "kind_requested": None, "resampled": False})
        records.append({"subject": subject.name, "images": [_abs(p) for p in subject.images],
                        "brain_mask": _abs(subject.brain_mask) if subject.brain_mask else "derived",
                        "prior": {**prior_record, "kind": provenance.get("source"), "params": params}})

    sidecar = _sidecar_base("fit")
    sidecar.update({
        "inputs": {"cohort": _abs(cohort), "csv": _abs(csv_file), "image_patterns": list(image_patterns),
                   "prior_pattern": prior_pattern, "mask_pattern": mask_pattern, "subjects": records},
        "outputs": {"model": _abs(model_path)},
        "prior": {"name": prior_name or "file", "kind_requested": prior_kind},
        "modality": modality,
        "seed": seed,
        "device": str(refiner.device_),
        "threads": n_threads,
        "n_channels": n_channels,
        "config": config.to_dict(),
        "training": {"n_iter": int(refiner.n_iter_), "crop_size": list(refiner.crop_size_),
                     "window_size": _window_size(refiner), "history": refiner.history_},
        "timings": {"load_and_prior_s": prior_seconds, "train_s": train_seconds - prior_seconds},
        "distributed": {"world_size": int(refiner.timings_["world_size"])},
    })
    sidecar["training"]["resumed_from"] = _abs(resume_path)
    with _transaction(overwrite) as tx:
        tx.add(refiner.save(model_path, overwrite=overwrite))
        sidecar["timings"]["total_s"] = time.perf_counter() - started
        tx.add(_atomic_write_text(sidecar_path, _dump_json(sidecar), overwrite=overwrite))
    _STATE["checkpoint"] = None
    if checkpoint_file.is_file():  # the model is complete: its training checkpoint is obsolete
        try:
            checkpoint_file.unlink()
            logger.info("removed the training checkpoint '%s'", checkpoint_file)
        except OSError as error:
            logger.warning("could not remove the obsolete training checkpoint '%s' (%s); delete "
                           "it by hand", checkpoint_file, error.strerror or error)
    for path in tx.written:
        _say(quiet, f"wrote {path}")


def _resume_checkpoint(path: Path, *, seed: int, rounds: int) -> Path:
    """The checkpoint ``fit --resume`` continues from, after checking that it can.

    Raises
    ------
    CheckpointError
        When there is no checkpoint, it is not one, or it was written with another seed.
    ConfigError
        With several self-training rounds (a checkpoint does not record its round).
    """
    from .exceptions import CheckpointError, ConfigError

    if rounds > 1:
        raise ConfigError(
            "--resume continues a one-round training only (a checkpoint does not record which "
            "self-training round it belongs to); drop --resume or --rounds"
        )
    if not path.is_file():
        raise CheckpointError(
            f"--resume: there is no checkpoint '{path}' to continue from (fit writes it with "
            "--checkpoint-every N and removes it when it finishes); drop --resume to start afresh"
        )
    facts = _checkpoint_facts(path)
    if not facts["training_checkpoint"]:
        raise CheckpointError(
            f"--resume: '{path}' is a finished model, not a training checkpoint; drop --resume "
            "(or move the file away) to train afresh"
        )
    if facts["random_state"] is not None and int(facts["random_state"]) != seed:
        raise CheckpointError(
            f"--resume: the checkpoint '{path}' was written by a fit with --seed "
            f"{facts['random_state']}, this one has --seed {seed}; resume with the same options"
        )
    logger.info("resuming from '%s' (iteration %d of %d)", path, facts["n_iter"], facts["iterations"])
    return path


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


def _load_model(model: str, device: str) -> Any:
    """:meth:`Refiner.load` for the command line: a folder is called a folder, and warnings
    torch gives while reading a file that then proves not to be a model are dropped (the
    error line says what is wrong); warnings of a model that loads are shown as usual."""
    from .exceptions import CheckpointError
    from .refiner import Refiner

    path = Path(model)
    if path.is_dir():
        raise CheckpointError(
            f"model file '{path}' is a folder; pass the model file inside it (written by "
            "'cgc-refine fit -o MODEL.pt' or --save-model)"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts = _checkpoint_facts(path)
        if facts["training_checkpoint"] and not facts["complete"]:
            raise CheckpointError(
                f"'{path}' is a training checkpoint (iteration {facts['n_iter']} of "
                f"{facts['iterations']}{_rounds_text(facts)}), written by 'fit --checkpoint-every' "
                "so that an interrupted fit can continue, not a finished model; finish the "
                "training by running the same fit command again with --resume, then pass the "
                "model it writes"
            )
        refiner = Refiner.load(model, device=device)
    for item in caught:
        warnings.showwarning(item.message, item.category, item.filename, item.lineno)
    if facts["training_checkpoint"]:
        logger.warning("'%s' is the training checkpoint of a finished training (iteration %d of %d); "
                       "using it as the model", path, facts["n_iter"], facts["iterations"])
    return refiner


def _rounds_text(facts: dict[str, Any]) -> str:
    return f", in a {facts['rounds']}-round self-training" if facts["rounds"] > 1 else ""


def _checkpoint_facts(path: Path) -> dict[str, Any]:
    """What a saved file is: a finished model (:meth:`Refiner.save`) or a periodic training
    checkpoint (it carries the optimiser state), and how far its training went.

    A checkpoint counts as complete when it was written at the last iteration of a one-round
    training; with several self-training rounds the round it belongs to is not recorded.

    Raises
    ------
    CheckpointError
        When the file is missing, unreadable or not a cgc_refine model.
    """
    from .refiner import _read_checkpoint

    state = _read_checkpoint(path)
    config = state.get("config") or {}
    n_iter = int(state.get("n_iter", 0))
    iterations = int(config.get("iterations", n_iter))
    rounds = int(config.get("rounds", 1))
    training = state.get("optimizer_state") is not None
    return {
        "training_checkpoint": training,
        "n_iter": n_iter,
        "iterations": iterations,
        "rounds": rounds,
        "random_state": state.get("random_state"),
        "complete": n_iter >= iterations and rounds == 1,
    }


@main.command("predict")
@click.option("--model", "model", required=True, metavar="MODEL",
              help="Model written by fit or --save-model.")
@click.option("--image", "images", multiple=True, required=True, metavar="IMG",
              help="Image file; repeat for several modalities, in the model's order.")
@click.option("--brain-mask", default=None, metavar="MASK", help="Brain mask (default: derived).")
@click.option("--save-proba", is_flag=True, help="Also write the probability map.")
@_truth_option
@_report_option
@_postprocess_options
@_device_option
@_common_options(output_help="Output mask file (.nii.gz) or folder (default: next to the image).")
@click.pass_context
def predict_command(
    ctx: click.Context, model: str, images: Sequence[str], brain_mask: str | None, save_proba: bool,
    truth: str | None, report: bool, threshold: float | None, min_size_mm3: float | None,
    device: str, output: str | None, overwrite: bool, quiet: bool, verbose: int,
    threads: int | None = None,
) -> None:
    """Segment one subject with a saved model."""
    quiet, _ = _sub_logging(ctx, quiet, verbose)
    overwrite = overwrite or bool((ctx.obj or {}).get("overwrite"))
    started = time.perf_counter()
    image_paths = [Path(p) for p in images]
    mask_path = _resolve_output(image_paths[0], output, MASK_SUFFIX)
    proba_path = _probseg_for(mask_path) if save_proba else None
    sidecar_path = _sidecar_for(mask_path)
    report_png, report_html = _report_paths(mask_path)
    if report:
        _require_report()
    inputs = image_paths + [Path(model)] + ([Path(brain_mask)] if brain_mask else [])
    if truth:
        inputs.append(Path(truth))
    plain = [(sidecar_path, "sidecar")]
    if report:
        plain += [(report_png, "report image"), (report_html, "report page")]
    _check_outputs([mask_path] + ([proba_path] if proba_path else []), plain, inputs, overwrite)
    _check_images_and_prior(image_paths, None)
    resolved = _resolve_device(device)
    n_threads = _configure_threads(threads)

    from .exceptions import CheckpointError

    tick = time.perf_counter()
    refiner = _load_model(model, str(resolved))
    volume = _load_image(image_paths)
    if volume.n_channels != refiner.n_channels_in_:
        raise CheckpointError(
            f"the model '{model}' was trained on {refiner.n_channels_in_} channel(s) but "
            f"{volume.n_channels} image(s) were given; pass the same modalities, in the same order"
        )
    brain = _brain_mask(brain_mask, volume, refiner.modality)
    truth_mask = _load_truth(truth, volume) if truth else None
    load_seconds = time.perf_counter() - tick
    with _progress(quiet) as bars:
        tick = time.perf_counter()
        probability = refiner.predict_proba(volume, brain, progress=bars.inference())
        mask = refiner.postprocess(probability, volume.spacing, threshold=threshold,
                                   min_size_mm3=min_size_mm3, affine=volume.affine, brain_mask=brain)
        inference_seconds = time.perf_counter() - tick
    import numpy as np

    n_voxels = int(mask.sum())
    sidecar = _sidecar_base("predict")
    sidecar.update({
        "inputs": {"model": _abs(model), "images": [_abs(p) for p in image_paths],
                   "brain_mask": _abs(brain_mask) if brain_mask else "derived"},
        "outputs": {"mask": _abs(mask_path), "probability": _abs(proba_path)},
        "model": {"n_iter": int(refiner.n_iter_), "n_channels": int(refiner.n_channels_in_),
                  "crop_size": list(refiner.crop_size_), "window_size": _window_size(refiner),
                  "priors": refiner.priors_},
        "modality": refiner.modality,
        "seed": int(refiner.random_state),
        "device": str(refiner.device_),
        "threads": n_threads,
        "threshold": float(refiner.config_.threshold if threshold is None else threshold),
        "min_size_mm3": float(refiner.config_.min_size_mm3 if min_size_mm3 is None else min_size_mm3),
        "config": refiner.config_.to_dict(),
        "lesion": {"voxels": n_voxels,
                   "volume_mm3": n_voxels * float(abs(np.linalg.det(volume.affine[:3, :3])))},
        "timings": {"load_s": load_seconds, "inference_s": inference_seconds},
    })
    scores = None
    if truth_mask is not None:
        scores = _score(mask, truth_mask, volume.spacing)
        sidecar["inputs"]["truth"] = _abs(truth)
        sidecar["evaluation"] = {"refined": scores}
        _say(quiet, f"Dice against the truth: {_dice_text(scores)}")
    report_spec = None
    if report:
        sidecar["outputs"].update(report_png=_abs(report_png), report_html=_abs(report_html))
        used_threshold = refiner.config_.threshold if threshold is None else threshold
        used_min_size = refiner.config_.min_size_mm3 if min_size_mm3 is None else min_size_mm3
        report_spec = {
            "png": report_png, "html": report_html, "prior": None, "truth": truth_mask,
            "modality": refiner.modality, "title": f"{image_paths[0].name}: lesion mask (model: {Path(model).name})",
            "numbers": _report_numbers(
                volume=volume, refined=mask, prior=None, truth=truth_mask, scores=scores,
                prior_scores=None,
                settings={"image": image_paths[0].name, "model": Path(model).name,
                          "modality": refiner.modality, "training iterations": int(refiner.n_iter_),
                          "threshold": float(used_threshold),
                          "min lesion size (mm^3)": float(used_min_size),
                          "device": str(refiner.device_)},
            ),
        }
    _write_results(
        refiner=refiner, volume=volume, mask=mask, probability=probability, mask_path=mask_path,
        proba_path=proba_path, model_path=None, sidecar_path=sidecar_path, sidecar=sidecar,
        overwrite=overwrite, started=started, quiet=quiet, report=report_spec,
    )
    _say(quiet, _summary_line(sidecar["lesion"]["volume_mm3"], None, time.perf_counter() - started))


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------

METRIC_NAMES = ("dice", "sensitivity", "precision", "hd95", "assd")


def _pairs(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    """(name, prediction, truth) triples from two files or two folders matched by file name."""
    if pred.is_dir() != truth.is_dir() and pred.exists() and truth.exists():
        raise InvalidImageError(
            f"--pred '{pred}' and --truth '{truth}' must both be files or both be folders"
        )
    if not pred.is_dir():
        return [(_strip_nifti(pred.name)[0], pred, truth)]
    if not truth.is_dir():
        raise InvalidImageError(f"truth folder '{truth}' does not exist; check the path")
    pairs = []
    unmatched = []
    for candidate in sorted(pred.iterdir()):
        if not candidate.is_file() or not _is_nifti_name(candidate) or candidate.name.startswith("."):
            continue
        match = truth / candidate.name
        if match.is_file():
            pairs.append((_strip_nifti(candidate.name)[0], candidate, match))
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


def _fmt(value: float) -> str:
    import math

    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}"


@main.command("evaluate")
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
    quiet, _ = _sub_logging(ctx, quiet, verbose)
    overwrite = overwrite or bool((ctx.obj or {}).get("overwrite"))
    csv_path = Path(csv_out) if csv_out else None
    pairs = _pairs(Path(pred), Path(truth))
    if csv_path is not None:
        _check_outputs([], [(csv_path, "CSV")], [p for _, a, b in pairs for p in (a, b)], overwrite)

    import numpy as np

    from .io import load_array, load_volume
    from .metrics import evaluate

    rows: list[tuple[str, dict[str, float]]] = []
    for name, pred_path, truth_path in pairs:
        with _dropping("cgc_refine.io", "is constant", "holds no voxel"):  # empty masks are valid
            truth_volume = load_volume(truth_path, name="truth")
            pred_data, _ = load_array(pred_path, reference=truth_volume, name="prediction",
                                      error=InvalidImageError)
        scores = evaluate(pred_data, truth_volume.data[0], spacing=truth_volume.spacing)
        rows.append((name, scores))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {k: float(np.nanmean([r[k] for _, r in rows])) for k in METRIC_NAMES}
    width = max(8, *(len(n) for n, _ in rows))
    click.echo(f"{'subject':<{width}}  " + "  ".join(f"{k:>11}" for k in METRIC_NAMES))
    for name, scores in rows:
        click.echo(f"{name:<{width}}  " + "  ".join(f"{_fmt(scores[k]):>11}" for k in METRIC_NAMES))
    click.echo(f"{'mean':<{width}}  " + "  ".join(f"{_fmt(mean[k]):>11}" for k in METRIC_NAMES))
    if csv_path is not None:
        import csv
        import io as text_io

        buffer = text_io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["subject", "pred", "truth", *METRIC_NAMES])
        for (name, scores), (_, pred_path, truth_path) in zip(rows, pairs):
            writer.writerow([name, str(pred_path), str(truth_path),
                             *(repr(float(scores[k])) for k in METRIC_NAMES)])
        writer.writerow(["mean", "", "", *(repr(mean[k]) for k in METRIC_NAMES)])
        _atomic_write_text(csv_path, buffer.getvalue(), overwrite=overwrite)
        _say(quiet, f"wrote {csv_path}")


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------

DEMO_SHAPE = (48, 48, 24)
DEMO_ITERATIONS = 100
#: Image noise of the demo phantom (standard deviation; tissue contrasts are 0.15-0.5), high
#: enough that a voxel-wise GMM leaves speckle for the network's spatial context to remove.
DEMO_NOISE = 0.15


@main.command("demo")
@click.option("--iterations", type=click.IntRange(min=1), default=DEMO_ITERATIONS, show_default=True,
              help="Training iterations.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of phantom and training, 0 to 2**32-1.")
@click.option("--fast/--full", default=True, show_default=True,
              help="Reduced network (CPU friendly) or the paper's network.")
@click.option("--shape", type=click.IntRange(min=8), nargs=3, default=DEMO_SHAPE, hidden=True,
              help="Advanced: phantom grid size.")
@click.option("--crop-size", type=click.IntRange(min=1), nargs=3, default=None, hidden=True,
              help="Advanced: training crop size (voxels).")
@_report_option
@_device_option
@_common_options(output_help="Folder for the phantom, its prior and the refined mask "
                             "(created if missing; nothing is written without -o).")
@click.pass_context
def demo_command(
    ctx: click.Context, iterations: int, seed: int, fast: bool, shape: Sequence[int],
    crop_size: Sequence[int] | None, report: bool, device: str, output: str | None, overwrite: bool,
    quiet: bool, verbose: int, threads: int | None = None,
) -> None:
    """Refine the GMM prior of a synthetic phantom and print the Dice before and after.

    Synthetic phantoms exercise the code; they say nothing about accuracy on real data.
    """
    quiet, _ = _sub_logging(ctx, quiet, verbose)
    overwrite = overwrite or bool((ctx.obj or {}).get("overwrite"))
    started = time.perf_counter()
    folder = Path(output) if output else None
    names = {
        "image": "phantom_FLAIR.nii.gz",
        "truth": "phantom_label-lesion_truth.nii.gz",
        "prior": "phantom_FLAIR_label-lesion_desc-gmm_probseg.nii.gz",
        "mask": f"phantom_FLAIR_{MASK_SUFFIX}.nii.gz",
        "probability": f"phantom_FLAIR_{PROBSEG_SUFFIX}.nii.gz",
    }
    paths: dict[str, Path] = {}
    if report and folder is None:
        raise click.UsageError("--report needs -o FOLDER (the demo writes nothing without it)",
                               ctx=ctx)
    if report:
        _require_report()
    if folder is not None:
        if folder.exists() and not folder.is_dir():
            raise OutputNotWritableError(f"-o '{folder}' is a file; the demo writes into a folder")
        if folder.is_dir():
            paths = {k: folder / v for k, v in names.items()}
            plain = [(folder / "phantom_FLAIR_label-lesion_mask.json", "sidecar")]
            if report:
                report_png, report_html = _report_paths(paths["mask"])
                plain += [(report_png, "report image"), (report_html, "report page")]
            _check_outputs(list(paths.values()), plain, [], overwrite)
        else:
            parent = folder.parent
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise OutputNotWritableError(
                    f"cannot create output folder '{folder}': '{parent}' is missing or not "
                    "writable; choose another folder"
                )
    config = _build_config(fast=fast, iterations=iterations, threshold=None, min_size_mm3=None,
                           crop_size=crop_size)
    resolved = _resolve_device(device)
    n_threads = _configure_threads(threads)

    from .metrics import dice
    from .phantom import make_phantom
    from .priors import GMMPrior
    from .refiner import Refiner

    phantom = make_phantom(tuple(int(s) for s in shape), seed=seed, noise=DEMO_NOISE)  # type: ignore[arg-type]
    volume = phantom.volume
    tick = time.perf_counter()
    pmap = GMMPrior(modality="mri").compute(volume)
    prior_seconds = time.perf_counter() - tick
    prior_dice = dice(pmap.data >= 0.5, phantom.truth)
    with _progress(quiet) as bars:
        refiner = Refiner([pmap], config=config, modality="mri", device=str(resolved),
                          random_state=seed, callback=bars.training(config.iterations))
        tick = time.perf_counter()
        refiner.fit([volume])
        train_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        probability = refiner.predict_proba(volume, progress=bars.inference())
        mask = refiner.postprocess(probability, volume.spacing)
        inference_seconds = time.perf_counter() - tick
    refined_dice = dice(mask, phantom.truth)

    click.echo(f"synthetic phantom {'x'.join(str(s) for s in shape)}, "
               f"{int(phantom.truth.sum())} lesion voxels, noise {DEMO_NOISE}; "
               f"{config.iterations} iterations on {resolved}")
    click.echo("(a synthetic phantom exercises the pipeline; it says nothing about accuracy on real data)")
    click.echo(f"prior Dice (GMM):  {prior_dice:.3f}")
    click.echo(f"refined Dice:      {refined_dice:.3f}")
    if not quiet:
        click.echo(f"time: prior {prior_seconds:.1f} s, training {train_seconds:.1f} s, "
                   f"inference {inference_seconds:.1f} s")

    if folder is None:
        return
    import numpy as np

    from .io import save_array, save_mask, save_probability_map

    created = False
    if not folder.exists():
        folder.mkdir()
        created = True
        paths = {k: folder / v for k, v in names.items()}
    sidecar_path = _sidecar_for(paths["mask"])
    sidecar = _sidecar_base("demo")
    sidecar.update({
        "inputs": {"phantom": {"shape": list(shape), "seed": seed}},
        "outputs": {k: _abs(v) for k, v in paths.items()},
        "prior": {"name": "gmm", "kind": pmap.source, "params": pmap.params},
        "modality": "mri",
        "seed": seed,
        "device": str(refiner.device_),
        "threads": n_threads,
        "config": config.to_dict(),
        "dice": {"prior": prior_dice, "refined": refined_dice},
        "timings": {"prior_s": prior_seconds, "train_s": train_seconds,
                    "inference_s": inference_seconds},
    })
    report_spec = None
    if report:
        report_png, report_html = _report_paths(paths["mask"])
        sidecar["outputs"].update(report_png=_abs(report_png), report_html=_abs(report_html))
        scores = _score(mask, phantom.truth, volume.spacing)
        prior_scores = _score(pmap.data >= 0.5, phantom.truth, volume.spacing)
        report_spec = {
            "png": report_png, "html": report_html, "prior": pmap.data, "truth": phantom.truth,
            "modality": "mri",
            "title": f"synthetic phantom (seed {seed}): GMM prior refined, {config.iterations} iterations",
            "numbers": _report_numbers(
                volume=volume, refined=mask, prior=pmap.data, truth=phantom.truth, scores=scores,
                prior_scores=prior_scores,
                settings={"data": "synthetic phantom (exercises the code; says nothing about "
                                  "accuracy on real data)",
                          "prior": "gmm", "configuration": "fast" if fast else "full",
                          "iterations": int(config.iterations), "seed": seed,
                          "device": str(refiner.device_)},
            ),
        }
    try:
        with _transaction(overwrite) as tx:
            tx.add(save_array(volume.data[0], volume, paths["image"], np.float32, overwrite))
            tx.add(save_mask(phantom.truth, volume, paths["truth"], overwrite=overwrite))
            tx.add(save_probability_map(pmap.data, volume, paths["prior"], overwrite=overwrite))
            tx.add(save_mask(mask, volume, paths["mask"], overwrite=overwrite))
            tx.add(save_probability_map(probability, volume, paths["probability"], overwrite=overwrite))
            if report_spec is not None:
                _write_report(tx, report_spec, volume=volume, refined=mask, sidecar=sidecar,
                              overwrite=overwrite)
            sidecar["timings"]["total_s"] = time.perf_counter() - started
            tx.add(_atomic_write_text(sidecar_path, _dump_json(sidecar), overwrite=overwrite))
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for path in tx.written:
        _say(quiet, f"wrote {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
