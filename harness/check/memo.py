"""What the checker computed before, kept beside the records so that a rerun recomputes nothing.

Two kinds of file, both derived from the records and both safe to delete:

- the per-sweep index (``index``): what each record file reduced to;
- ``RESULTS/.index/stats.bin``, the ``Memo``: results of the costly statistics (bootstrap
  intervals, P(A>B), score differences, power, aggregates across categories) by a hash of
  their inputs. A result is reused exactly
  when its inputs are equal, whatever sweep or group they come from, so a changed record
  changes the key, never the answer; intervals are the same as recomputed (bootstraps are seeded).

Every such file is framed (a magic line, the code that wrote it, a length and a CRC-32), so
a truncated or damaged one, or one written by other code, reads as absent and is rebuilt.
Each is replaced atomically: a reader sees the old file or the new one; two writers at once
each write a whole, correct file and the last one stays. A store that cannot be written
(read-only) is checked without them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from harness.fsutil import atomic_write_bytes

MEMO_DIR = ".index"  # under the results directory: not a sweep (it has no runs/)
_MAGIC = b"harness-index\n"
_HEAD = struct.Struct("<16sIQ")  # code hash, CRC-32 of the body, length of the body
T = TypeVar("T")
MAX_ENTRIES = 2_000_000  # beyond this, only what the last check used is kept


@functools.cache
def code_hash(*files: str, versions: tuple[str, ...] = ()) -> bytes:
    """A hash of source files (beside this module) and package versions: what an index or memo
    was computed with. Other code reads the file as absent."""
    h = hashlib.blake2b(digest_size=16)
    here = Path(__file__).parent.parent
    for name in files:
        h.update((here / name).read_bytes())
    for package in versions:
        h.update(importlib.metadata.version(package).encode())
    return h.digest()


def frame(code: bytes, body: bytes) -> bytes:
    return _MAGIC + _HEAD.pack(code, zlib.crc32(body), len(body)) + body


def unframe(data: bytes, code: bytes) -> memoryview | None:
    """The body of a framed file, or None if it is damaged, truncated or another code's."""
    head = len(_MAGIC) + _HEAD.size
    if not data.startswith(_MAGIC) or len(data) < head:
        return None
    written_by, crc, length = _HEAD.unpack_from(data, len(_MAGIC))
    body = memoryview(data)[head:]
    if written_by != code or length != len(body) or zlib.crc32(body) != crc:
        return None
    return body


def read_framed(path: Path, code: bytes, decoder: msgspec.msgpack.Decoder[T]) -> T | None:
    """A framed file's content, or None where there is none to trust (missing, damaged, cut
    short, another code's, or not what ``decoder`` expects)."""
    try:
        body = unframe(path.read_bytes(), code)
        return decoder.decode(body) if body is not None else None
    except (OSError, msgspec.DecodeError):
        return None


def write_framed(path: Path, code: bytes, body: bytes) -> bool:
    """Write atomically; False when the store cannot be written (the check goes on without)."""
    try:
        atomic_write_bytes(path, frame(code, body))
    except OSError:
        return False
    return True


Value = list[float | bool | None]


class Memo:
    """Results by the hash of their inputs (``key``), read from and saved to one file."""

    _decode = msgspec.msgpack.Decoder(dict[str, Value])

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        files = ("check/stats.py", "check/pairs.py", "check/power.py", "check/across.py", "check/memo.py")
        self._code = code_hash(*files, versions=("numpy", "scipy"))
        self._old: dict[str, Value] = (read_framed(path, self._code, self._decode) if path else None) or {}
        self._used: dict[str, Value] = {}
        self.added = 0

    @classmethod
    def beside(cls, root: Path) -> Memo:
        return cls(root / MEMO_DIR / "stats.bin")

    @staticmethod
    def key(kind: bytes, *parts: bytes) -> str:
        """A key for one computation: its kind and inputs, each length-prefixed (unambiguous)."""
        h = hashlib.blake2b(kind, digest_size=16)
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest()

    def get(self, key: str) -> Value | None:
        value = self._used.get(key)
        if value is None:
            value = self._old.get(key)
            if value is not None:
                self._used[key] = value
        return value

    def put(self, key: str, value: list[Any]) -> None:
        self._used[key] = value
        self.added += 1

    def each(self, keys: Sequence[str], compute: Callable[[list[int]], Iterable[Sequence[Any]]]) -> list[Value]:
        """Each key's value: the memo's, or computed in one call for all it lacks
        (``compute`` gets their positions in ``keys`` and gives their values in that order)."""
        hits = [self.get(k) for k in keys]
        missing = [i for i, hit in enumerate(hits) if hit is None]
        for i, value in zip(missing, compute(missing) if missing else [], strict=True):
            hits[i] = list(value)
            self.put(keys[i], hits[i])  # type: ignore[arg-type]
        return hits  # type: ignore[return-value]

    def save(self) -> None:
        """Write what was computed, if anything was, with what was there before (up to
        MAX_ENTRIES: then only what this check used)."""
        if self.path is None or not self.added:
            return
        merged = {**self._old, **self._used} if len(self._old) + len(self._used) <= MAX_ENTRIES else self._used
        write_framed(self.path, self._code, msgspec.msgpack.encode(merged))
