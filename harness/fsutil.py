"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.errors import HarnessError


@functools.cache
def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """The mode ``open()`` would give a new file; mkstemp's 0600 would hide records from
    other users and from workers running under another uid."""
    return 0o666 & ~_umask()


class WriteError(HarnessError, OSError):
    """A file that could not be written, in one line that says where and what to do; still an
    ``OSError`` (with its ``errno``) for code that handles those."""


# What to do about the errors a write meets most; a file in the way is named instead.
_ADVICE = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
}


def os_error_line(exc: OSError, path: Path | str | None = None) -> str:
    """``path: reason (what to do)`` for an OSError: its words without ``[Errno N]``, the path
    it happened at (``path``, else the error's own), and the way out where there is a usual one."""
    where = path if path is not None else exc.filename
    line = f"{where}: {exc.strerror or exc}" if where is not None else str(exc.strerror or exc)
    advice = _ADVICE.get(exc.errno or 0)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and where is not None:
        blocker = _file_in_the_way(Path(where))
        advice = f"{blocker} is a file, not a directory" if blocker else None
    return f"{line} ({advice})" if advice else line


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest of ``path`` and its parents that exists, if it is not a directory."""
    existing = _nearest_existing(path)
    return None if existing.is_dir() or not existing.exists() else existing


def _nearest_existing(path: Path) -> Path:
    """``path``, or the nearest of its parents that exists (the root if none does)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename over ``path``, fsync the directory.

    A failed write (a full disk, a read-only directory) leaves the old file as it was, removes
    the temp file, and raises a ``WriteError`` naming ``path``.
    """
    try:
        _write(path, data)
    except OSError as exc:
        error = WriteError(f"cannot write {os_error_line(exc, path)}")
        error.errno = exc.errno
        raise error from exc


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline, so equal records are equal bytes."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def staged_dir(final: Path, marker: str) -> Iterator[Path]:
    """Build a directory aside, then swap it in for ``final`` whole.

    ``final`` is replaced only if it holds ``marker`` (it was made this way before), so a
    directory of someone else's is never deleted. A crash leaves at most a hidden temp dir.
    """
    if final.exists() and not (final / marker).exists():
        raise HarnessError(f"{final} exists and was not written by this tool; choose another directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".new"))
    try:
        os.chmod(stage, 0o777 & ~_umask())
        yield stage
        (stage / marker).touch()
        old = stage.with_suffix(".old")
        if final.exists():
            os.replace(final, old)
        os.replace(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_writable(path: Path, what: str) -> None:
    """Fail before the work, not after it, when its output could not be written at ``path``."""
    existing = _nearest_existing(path)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise HarnessError(f"{what} {path} cannot be written ({existing} is not a writable directory)")
