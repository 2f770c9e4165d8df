"""Small helpers shared by several modules."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .exceptions import CGCRefineError, OutputExistsError, OutputNotWritableError

__all__ = [
    "OutputSet",
    "active_output_set",
    "atomic_write",
    "check_writable_target",
    "jsonable",
    "move_into_place",
    "one_line",
    "overwrite_hint",
    "overwrite_wording",
    "write_text_atomic",
]

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


def one_line(text: Any) -> str:
    """``text`` (or an exception's message) on a single line; an empty message gives the
    exception's type name."""
    line = " ".join(str(text).split())
    if not line and isinstance(text, BaseException):
        return type(text).__name__
    return line


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
    kept = False
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
        output_set = _OUTPUT_SET.get()
        if output_set is not None:  # inside OutputSet.collect(): moved into place on commit
            output_set.keep(tmp, path)
            kept = True
        else:
            move_into_place(tmp, path, overwrite=overwrite, what=what)
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
        if not kept:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return path


def move_into_place(tmp: Path, dest: Path, *, overwrite: bool, what: str = "output") -> None:
    """Move a finished temporary file to its destination; the one commit step of every writer.

    With ``overwrite`` an existing ``dest`` is replaced atomically (:func:`os.replace`).
    Without it an existing file is never replaced, not even one that appeared while writing:
    ``dest`` is made a hard link to ``tmp`` (atomic, and it fails when ``dest`` exists) and
    the caller removes ``tmp`` afterwards; on file systems without hard links ``dest`` is
    checked, then replaced.

    Parameters
    ----------
    tmp : pathlib.Path
        The complete temporary file, in the destination's folder.
    dest : pathlib.Path
        The destination.
    overwrite : bool
        Whether an existing ``dest`` may be replaced.
    what : str
        What the file is, for messages.

    Raises
    ------
    OutputExistsError
        If ``dest`` exists and ``overwrite`` is False.
    """
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # atomic and fails if dest exists: no check-then-act race
    except FileExistsError as exc:
        raise OutputExistsError(
            f"{what} '{dest}' already exists (it appeared while writing); {overwrite_hint()} "
            "to replace it, or choose another path"
        ) from exc
    except OSError:
        # File systems without hard links: check, then replace.
        if os.path.lexists(dest):
            raise OutputExistsError(
                f"{what} '{dest}' already exists; {overwrite_hint()} to replace it, or "
                "choose another path"
            ) from None
        os.replace(tmp, dest)


def write_text_atomic(path: Path, text: str, *, overwrite: bool, what: str = "output") -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`; returns ``path``."""
    return atomic_write(path, lambda handle: handle.write(text), overwrite=overwrite, binary=False,
                        what=what)


# --------------------------------------------------------------------------------------------
# Output sets: several files that replace the previous ones together or not at all
# --------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

try:  # POSIX; elsewhere output sets are committed without a lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# The output set that writers hand their finished temporary files to (see OutputSet.collect).
_OUTPUT_SET: contextvars.ContextVar[OutputSet | None] = contextvars.ContextVar(
    "cgc_refine_output_set", default=None
)


def active_output_set() -> OutputSet | None:
    """The :class:`OutputSet` collecting files in this context, or None (write in place)."""
    return _OUTPUT_SET.get()


def lock_path_for(path: Path) -> Path:
    """The hidden lock file guarding output ``path``: ``.<name>.lock`` in the same folder."""
    return path.parent / f".{path.name}.lock"


def _acquire_lock(path: Path) -> int | None:
    """Hold an exclusive ``flock`` on ``path`` (created if needed); returns its descriptor.

    The lock file is removed by :func:`_release_lock`, so a waiter may lock a file that was
    just unlinked; it then tries again on the current file. Returns None (no lock) where the
    platform or file system has no ``flock``.
    """
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            logger.warning("could not create the lock file '%s' (%s); writing without a lock",
                           path, exc.strerror or exc)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on some network file systems
            os.close(fd)
            logger.warning("could not lock '%s' (%s); writing without a lock", path, exc.strerror or exc)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this file meanwhile: lock the current one


def _release_lock(path: Path, fd: int | None) -> None:
    """Remove the lock file ``path`` (still holding it, so no waiter keeps a stale one) and unlock."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def locked(paths: list[Path]) -> Iterator[None]:
    """Hold the lock file of every path in ``paths`` (in one global order: no deadlock)."""
    locks = sorted({Path(os.path.abspath(lock_path_for(p))) for p in paths}, key=str)
    held: list[tuple[Path, int | None]] = []
    try:
        for lock in locks:
            held.append((lock, _acquire_lock(lock)))
        yield
    finally:
        for lock, fd in reversed(held):
            _release_lock(lock, fd)


class OutputSet:
    """The files of one result, written to hidden temporaries and moved into place together.

    Inside :meth:`collect`, :func:`atomic_write` and the NIfTI writers of :mod:`cgc_refine.io`
    leave their finished temporary file (in the destination's folder) with the set instead of
    renaming it. :meth:`commit` then moves every file into place while holding an exclusive
    lock on each destination (a hidden ``.<name>.lock`` file next to it, removed afterwards),
    so two commands writing the same outputs at once never mix their files: the set left is
    one command's. If a move fails, the files already moved are put back, so the previous
    outputs stay complete; :meth:`discard` removes the temporaries.

    Parameters
    ----------
    overwrite : bool
        Whether existing destinations may be replaced. Without it, a destination that
        appeared while writing fails the whole commit and nothing is moved.
    """

    def __init__(self, overwrite: bool) -> None:
        self.overwrite = overwrite
        self._files: dict[Path, Path] = {}  # destination -> finished temporary file

    @property
    def destinations(self) -> list[Path]:
        """The destinations of the files collected so far, in the order they were written."""
        return list(self._files)

    @contextlib.contextmanager
    def collect(self) -> Iterator[OutputSet]:
        """Within the block, writers hand their files to this set instead of writing in place."""
        token = _OUTPUT_SET.set(self)
        try:
            yield self
        finally:
            _OUTPUT_SET.reset(token)

    def keep(self, tmp: Path, dest: Path) -> None:
        """Take the finished temporary file ``tmp``, to be moved to ``dest`` on commit."""
        previous = self._files.pop(Path(dest), None)
        if previous is not None:  # written twice: the later file wins
            with contextlib.suppress(OSError):
                previous.unlink()
        self._files[Path(dest)] = Path(tmp)

    def discard(self) -> None:
        """Remove every temporary file not yet moved into place."""
        for tmp in self._files.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._files = {}

    def commit(self) -> list[Path]:
        """Move every file into place, all or none; returns the destinations.

        Raises
        ------
        OutputExistsError
            Without ``overwrite``, if a destination appeared while writing (nothing is moved).
        OutputNotWritableError
            If a file cannot be moved into place; the previous outputs are restored.
        """
        files = list(self._files.items())
        if not files:
            return []
        try:
            with locked([dest for dest, _ in files]):
                self._move_all(files)
        finally:
            self.discard()
        return [dest for dest, _ in files]

    def _move_all(self, files: list[tuple[Path, Path]]) -> None:
        if not self.overwrite:
            for dest, _ in files:
                if os.path.lexists(dest):
                    raise OutputExistsError(
                        f"output '{dest}' already exists (it appeared while writing); "
                        f"{overwrite_hint()} to replace it, or choose another path"
                    )
        moved: list[tuple[Path, Path | None]] = []  # destination, backup of the previous file
        try:
            for dest, tmp in files:
                backup = self._backup(dest)
                try:
                    self._place(tmp, dest)
                except BaseException:
                    if backup is not None:
                        self._restore([(dest, backup)])
                    raise
                moved.append((dest, backup))
        except BaseException as exc:
            self._restore(moved)
            if isinstance(exc, FileExistsError):
                raise OutputExistsError(
                    f"output '{exc.filename}' already exists (it appeared while writing); "
                    f"{overwrite_hint()} to replace it, or choose another path"
                ) from exc
            if isinstance(exc, OSError):
                raise OutputNotWritableError(
                    f"could not move the new outputs into place ({exc.strerror or exc}); the "
                    f"previous outputs were kept: check the folder of '{files[0][0]}' (permissions, "
                    "free space), or choose another output path"
                ) from exc
            raise
        for _, backup in moved:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()

    def _place(self, tmp: Path, dest: Path) -> None:
        """Move ``tmp`` to ``dest``; without ``overwrite`` never replace a file that appeared."""
        if self.overwrite:
            os.replace(tmp, dest)
            return
        try:
            os.link(tmp, dest)  # atomic, and fails if dest exists
        except FileExistsError:
            raise
        except OSError:  # no hard links here: check, then move
            if os.path.lexists(dest):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest)) from None
            os.replace(tmp, dest)

    @staticmethod
    def _backup(dest: Path) -> Path | None:
        """A hidden second name for the file at ``dest`` (if any), to put it back on failure."""
        if not os.path.lexists(dest):
            return None
        backup = dest.parent / f".{dest.name}.old-{secrets.token_hex(6)}"
        try:
            os.link(dest, backup, follow_symlinks=False)
        except OSError:  # no hard links here: move it aside instead
            os.replace(dest, backup)
        return backup

    @staticmethod
    def _restore(moved: list[tuple[Path, Path | None]]) -> None:
        """Put the previous files back (or remove the new ones that had none), latest first."""
        for dest, backup in reversed(moved):
            try:
                if backup is not None:
                    os.replace(backup, dest)
                    # a no-op when both names are links to one file (nothing was moved yet)
                    with contextlib.suppress(FileNotFoundError):
                        backup.unlink()
                else:
                    with contextlib.suppress(FileNotFoundError):
                        dest.unlink()
            except OSError as exc:
                logger.error("could not restore '%s' (%s); its previous version is '%s'",
                             dest, exc.strerror or exc, backup)
