"""Small helpers shared by several modules."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from pathlib import Path
from typing import Any

from .exceptions import CGCRefineError, OutputExistsError, OutputNotWritableError

__all__ = ["atomic_write", "check_writable_target", "jsonable"]


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
            f"{what} '{path}' already exists; pass overwrite=True (--overwrite) to replace it, "
            "or choose another path"
        )
    return path


def atomic_write(path: Path, write: Any, *, overwrite: bool, binary: bool) -> Path:
    """Call ``write(handle)`` on a hidden temporary file next to ``path``, then rename it.

    The file appears complete or not at all: any failure, an interrupt included, removes the
    temporary file. Without ``overwrite`` an existing ``path`` is refused, also one that
    appeared while writing.
    """
    check_writable_target(path, overwrite)
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
                f"'{path}' already exists (it appeared while writing); pass overwrite=True "
                "(--overwrite) to replace it, or choose another path"
            )
        os.replace(tmp, path)
    except PermissionError as exc:
        raise OutputNotWritableError(
            f"cannot write '{path}': permission denied ({exc.strerror}); fix the folder's "
            "permissions or choose another output folder"
        ) from exc
    except OSError as exc:
        if isinstance(exc, CGCRefineError):
            raise
        raise OutputNotWritableError(
            f"cannot write '{path}' ({exc.strerror or exc}); check free disk space and the "
            "output folder"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path
