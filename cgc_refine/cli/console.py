"""Console output of the command line: log lines, progress bars or lines, result lines.

Library code logs through :mod:`logging` and reports progress through
:class:`cgc_refine.workflow.Progress` hooks; this module turns both into text on the
terminal: ``cgc-refine: <level>: <message>`` lines on stderr, progress bars on a terminal
(log lines every tenth or 30 s otherwise), and result lines on stdout (hidden by ``-q``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from ..workflow.types import Progress

__all__ = ["PROG", "STATE", "ConsoleProgress", "configure_logging", "duration", "remove_handlers",
           "say", "show_warning", "sub_logging", "summary_line", "wrote"]

PROG = "cgc-refine"

#: Per-invocation state, reset by the group for every command: the verbosity (for tracebacks
#: and log formats), the arguments (for sidecars) and a training checkpoint kept on interrupt.
STATE: dict[str, Any] = {"verbose": 0, "quiet": False, "argv": [], "checkpoint": None}


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
        if STATE["verbose"] >= 2:
            return f"{PROG}: {level}: [{record.name}] {message}"
        return f"{PROG}: {level}: {message}"


def configure_logging(quiet: bool, verbose: int) -> None:
    """Set up the ``cgc_refine`` logger: WARNING, INFO with -v, DEBUG with -vv, ERROR with -q."""
    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose cannot be used together")
    STATE["verbose"] = max(STATE["verbose"], verbose)
    STATE["quiet"] = quiet
    root = logging.getLogger("cgc_refine")
    remove_handlers()
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


def remove_handlers() -> None:
    root = logging.getLogger("cgc_refine")
    for handler in list(root.handlers):
        if getattr(handler, "_cgc_cli", False):
            root.removeHandler(handler)


def show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
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


def duration(seconds: float) -> str:
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
            eta = f", ETA {duration(rate * (total - done))}"
        elapsed = f", {duration(now - first_time)} elapsed" if done > first_done else ""
        round_text = f" (round {self.round})" if self.round > 1 else ""
        click.echo(f"{PROG}: {self.label}{round_text}: {self.unit} {done}/{total} "
                   f"({100 * done // total}%){extra}{elapsed}{eta}", err=True)


class ConsoleProgress(Progress):
    """Progress of training steps and inference windows on stderr: bars on a terminal, log
    lines (:class:`_LogProgress`) otherwise, nothing with ``-q``; notes are result lines on
    stdout (hidden by ``-q``)."""

    def __init__(self, enabled: bool, log: bool = False, quiet: bool = False) -> None:
        self.enabled = enabled
        self.quiet = quiet
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

    def note(self, message: str) -> None:
        """A result line on stdout (hidden by -q)."""
        say(self.quiet, message)

    def close(self) -> None:
        """Close the open progress bar, if any."""
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._bar = None

    @classmethod
    def for_console(cls, quiet: bool) -> "ConsoleProgress":
        """Bars on a terminal, log lines otherwise, nothing with ``quiet``."""
        tty = _stderr_is_tty()
        return cls(enabled=not quiet and tty, log=not quiet and not tty, quiet=quiet)


def say(quiet: bool, message: str) -> None:
    """A result line on stdout (hidden by -q)."""
    if not quiet:
        click.echo(message)


def summary_line(lesion_mm3: float, prior_mm3: float | None, seconds: float) -> str:
    """The last line of a single-subject run: lesion volume, change from the prior, time."""
    text = f"done: lesion volume {lesion_mm3 / 1000.0:.2f} ml"
    if prior_mm3 is not None:
        change = (lesion_mm3 - prior_mm3) / 1000.0
        relative = f", {100.0 * change * 1000.0 / prior_mm3:+.0f}%" if prior_mm3 > 0 else ""
        text += f" (prior {prior_mm3 / 1000.0:.2f} ml: {change:+.2f} ml{relative})"
    return f"{text}, in {duration(seconds)}"


def sub_logging(ctx: click.Context, quiet: bool, verbose: int) -> tuple[bool, int]:
    """Combine the group's -q/-v with the subcommand's and configure logging."""
    parent = ctx.obj or {}
    quiet = quiet or bool(parent.get("quiet"))
    verbose = verbose or int(parent.get("verbose", 0))
    configure_logging(quiet, verbose)
    return quiet, verbose


def wrote(quiet: bool, paths: Any) -> None:
    """A ``wrote <path>`` result line per output."""
    for path in paths:
        say(quiet, f"wrote {path}")
