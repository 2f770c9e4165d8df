"""The command group's error handling: every failure becomes one line and an exit code.

Anticipated failures (:class:`~cgc_refine.exceptions.CGCRefineError` and click's usage
errors) end in ``cgc-refine: error: <message>`` on stderr and exit code 2; unexpected ones
exit with 1 (traceback with ``-v``); an interrupt exits with 130 (143 for SIGTERM) and leaves
no partial output.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from .._utils import one_line, overwrite_wording
from ..exceptions import CGCRefineError
from .console import PROG, STATE, remove_handlers, show_warning

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "EXIT_UNEXPECTED", "CLIGroup"]

EXIT_ERROR = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as shells report a kill


def _error(message: str) -> None:
    click.echo(f"{PROG}: error: {one_line(message)}", err=True)


def _interrupted() -> None:
    """The interrupt line; it names a training checkpoint kept for ``fit --resume``."""
    kept = STATE.get("checkpoint")
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


class CLIGroup(click.Group):
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
        STATE.update(verbose=_count_verbose(argv), argv=argv, quiet=False, checkpoint=None)
        code = 0
        previous_sigterm = _catch_sigterm()
        try:
            with warnings.catch_warnings(), overwrite_wording("add --overwrite"):
                warnings.showwarning = show_warning
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
            if STATE["verbose"] >= 2:
                traceback.print_exc(file=sys.stderr)
            _error(str(exc) or type(exc).__name__)
            code = EXIT_ERROR
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if STATE["verbose"]:
                traceback.print_exc(file=sys.stderr)
                hint = ""
            else:
                hint = " (run again with -v for the traceback)"
            _error(f"unexpected {type(exc).__name__}: {one_line(str(exc))}{hint}")
            code = EXIT_UNEXPECTED
        finally:
            remove_handlers()
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
