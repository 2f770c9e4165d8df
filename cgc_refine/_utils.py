"""Small helpers shared by several modules."""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .exceptions import CGCRefineError, OutputExistsError, OutputNotWritableError

__all__ = ["atomic_write", "check_writable_target", "jsonable", "overwrite_hint", "overwrite_wording"]

# How "replace the existing file" is spelled to the caller: the Python keyword by default,
# the command-line flag while the CLI runs (see :func:`overwrite_wording`).
_OVERWRITE_HINT: contextvars.ContextVar[str] = contextvars.ContextVar(
    "cgc_refine_overwrite_hint", default="pass overwrite=True"
)


def overwrite_hint() -> str:
    """How to ask for replacement of an existing output, in the caller's terms.

    ``"pass overwrite=True"`` for Python callers; the command line switches it to
    ``"add --overwrite"`` with :func:`overwrite_wording`.
    """
    return _OVERWRITE_HINT.get()


@contextlib.contextmanager
def overwrite_wording(hint: str) -> Iterator[None]:
    """Within the block, messages about existing outputs say ``hint`` (e.g. ``"add --overwrite"``)."""
    token = _OVERWRITE_HINT.set(hint)
    try:
        yield
    finally:
        _OVERWRITE_HINT.reset(token)


def jsonable(value: Any, *, strict: bool = False) -> Any:
    """Convert a nested value to plain JSON types.

    NumPy scalars and arrays (and torch tensors) become Python numbers and lists, tuples and
    sets become lists, paths become strings, dictionary keys become strings. The result holds
    only dict, list, str, int, float, bool and None, which both ``json.dumps`` and
    ``torch.load(weights_only=True)`` accept. With ``strict``, NaN and infinities become
    None (strict JSON has no such numbers) and unknown objects their ``str``.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v, strict=strict) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v, strict=strict) for v in value]
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return None if strict and not math.isfinite(value) else value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return jsonable(value.tolist(), strict=strict)
    return str(value) if strict else value


def check_writable_target(path: Path, overwrite: bool, *, what: str = "output") -> Path:
    """Refuse a folder, a missing or read-only parent folder, or an existing file without
    ``overwrite``; ``what`` names the file in the messages. Returns ``path``."""
    if path.is_dir():
        raise OutputNotWritableError(f"cannot write {what} '{path}': it is an existing folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise OutputNotWritableError(
            f"cannot write {what} '{path}': folder '{folder}' does not exist; create it first "
            f"(mkdir -p '{folder}') or choose another path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputNotWritableError(
            f"cannot write {what} '{path}': folder '{folder}' is not writable; fix its "
            "permissions or choose another output folder"
        )
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(
            f"{what} '{path}' already exists; {overwrite_hint()} to replace it, or choose "
            "another path"
        )
    return path


def atomic_write(
    path: Path,
    write: Any,
    *,
    overwrite: bool,
    binary: bool,
    what: str = "output",
    error: type[CGCRefineError] = OutputNotWritableError,
) -> Path:
    """Call ``write(handle)`` on a hidden temporary file next to ``path``, then rename it.

    The file appears complete or not at all: any failure, an interrupt included, removes the
    temporary file. Without ``overwrite`` an existing ``path`` is refused, also one that
    appeared while writing.

    Parameters
    ----------
    path : pathlib.Path
        The destination.
    write : callable
        Called with the open temporary file; writes the content.
    overwrite : bool
        Whether an existing ``path`` may be replaced.
    binary : bool
        Open the temporary file in binary (True) or UTF-8 text mode.
    what : str
        What the file is, for messages (``"model"``, ``"sidecar"``...).
    error : type
        The error raised when writing fails for a reason other than permissions: an
        ``OSError`` (disk full, file-size limit, I/O error) or a ``RuntimeError`` from the
        serialiser (``torch.save`` reports a failed write as ``RuntimeError`` from
        ``inline_container.cc``). :class:`OutputNotWritableError` by default; the model
        writer passes :class:`CheckpointError`.

    Raises
    ------
    OutputExistsError
        If ``path`` exists (or appeared while writing) and ``overwrite`` is False.
    OutputNotWritableError
        If ``path`` is a folder, its folder is missing or not writable, or permission is denied.
    CGCRefineError
        ``error``, if writing or renaming fails otherwise.
    """
    check_writable_target(path, overwrite, what=what)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
    try:
        handle: Any
        if binary:
            handle = open(tmp, "xb")  # noqa: SIM115 - closed below
        else:
            handle = open(tmp, "x", encoding="utf-8", newline="")  # noqa: SIM115
        with handle:
            write(handle)
            handle.flush()
            with contextlib.suppress(OSError):
                os.fsync(handle.fileno())
        if not overwrite and os.path.lexists(path):
            raise OutputExistsError(
                f"{what} '{path}' already exists (it appeared while writing); {overwrite_hint()} "
                "to replace it, or choose another path"
            )
        os.replace(tmp, path)
    except CGCRefineError:
        raise
    except PermissionError as exc:
        raise OutputNotWritableError(
            f"cannot write {what} '{path}': permission denied ({exc.strerror}); fix the folder's "
            "permissions or choose another output folder"
        ) from exc
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = " ".join(str(exc).split())[:200]
        raise error(
            f"writing {what} '{path}' failed ({type(exc).__name__}: {reason or 'no detail'}); "
            "nothing was written there: check free disk space, quotas and file-size limits "
            "(ulimit -f) of the output folder, or choose another output path"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path
