"""The checker's index: per sweep, what each record file reduced to, so that a rerun reads only
the files that changed.

``RESULTS/<sweep>/index/checker.bin`` holds, per record file, its state (inode, size,
modification time), a hash of its bytes and what reading it gave (its ``Run``, or why it is
malformed or corrupt). The records stay the truth:

- a file whose state differs from its entry is read again; if its bytes hash as before (a
  copy, a touch) its entry is kept, else it is parsed and verified again;
- a file changed less than RACY_NS before the index was written is hashed again: a second
  change in the same clock tick would keep its size and times (git's "racily clean" files);
- new files are read, removed ones dropped;
- an index that is missing, damaged, or written by other code is rebuilt (``memo`` frames it).

How files are framed, written and shared is ``memo``'s; deleting ``index/`` loses nothing.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from harness.check.load import Entry, FileState, Parsed, Store, decode_parsed, parse_encoded, parse_files
from harness.check.memo import Memo, code_hash, read_framed, write_framed
from harness.errors import HarnessError
from harness.store import ResultsStore

INDEX = Path("index") / "checker.bin"  # under the sweep's directory, beside runs/
RACY_NS = 2_000_000_000  # file times coarser than this are rare (FAT: 2 s)
PARALLEL_MIN_FILES = 2000  # below this, worker start-up costs more than it saves


class SweepIndex(msgspec.Struct):
    written_ns: int  # when the files' states were taken (before any was read)
    entries: dict[str, Entry]  # relative path -> what reading it gave
    params: dict[str, dict[str, Any]]  # config_id -> params, of the entries' runs
    envs: dict[str, dict[str, Any]]  # env_id -> environment, of the entries' runs


_INDEX_DECODER = msgspec.msgpack.Decoder(SweepIndex)


def _code() -> bytes:
    return code_hash("check/load.py", "check/verify.py", "check/index.py", "record.py", versions=("msgspec", "numpy"))


def read_index(root: Path, sweep: str) -> SweepIndex | None:
    """A sweep's index, or None where there is none to trust."""
    return read_framed(root / sweep / INDEX, _code(), _INDEX_DECODER)


def _parse(root: Path, todo: list[tuple[str, str | None]]) -> list[Parsed]:
    """Read the files to (re)read, in worker processes when there are many."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cpus, 8) if len(todo) >= PARALLEL_MIN_FILES else 1
    if workers == 1:
        return [parse_files(str(root), todo)] if todo else []
    step = -(-len(todo) // (workers * 4))
    chunks = [todo[i : i + step] for i in range(0, len(todo), step)]
    with ProcessPoolExecutor(workers) as pool:
        return [decode_parsed(b) for b in pool.map(parse_encoded, [str(root)] * len(chunks), chunks)]


def _refresh(root: Path, sweeps: Sequence[str]) -> dict[str, SweepIndex]:
    """Each sweep's index brought up to date with its files (rewritten where anything changed)."""
    files = ResultsStore(root)
    now = time.time_ns()
    states: dict[str, dict[str, FileState]] = {}
    old: dict[str, SweepIndex | None] = {}
    todo: list[tuple[str, str | None]] = []
    for sweep in sweeps:
        states[sweep] = {rel: FileState.of(st) for rel, st in files.file_stats(sweep).items()}
        old[sweep] = index = read_index(root, sweep)
        for rel, state in states[sweep].items():
            entry = index.entries.get(rel) if index else None
            if index is None or entry is None or entry.state != state or state.ctime_ns >= index.written_ns - RACY_NS:
                todo.append((rel, entry.digest if entry else None))
    parsed: dict[str, dict[str, Entry]] = {sweep: {} for sweep in sweeps}
    params: dict[str, dict[str, Any]] = {}
    envs: dict[str, dict[str, Any]] = {}
    for read, p, e in _parse(root, todo):
        params.update(p)
        envs.update(e)
        for rel, entry in read:
            parsed[rel.split("/", 1)[0]][rel] = entry
    out = {}
    for sweep in sweeps:
        before = old[sweep]
        kept = before.entries if before else {}
        entries = {}
        for rel in states[sweep]:
            entry = parsed[sweep].get(rel, kept.get(rel))
            if entry is not None and entry.same:  # touched or copied, the same bytes: its old entry
                entry = msgspec.structs.replace(kept[rel], state=entry.state)
            if entry is not None:  # None: removed while being read
                entries[rel] = entry
        runs = [e.run for e in entries.values() if e.run is not None]
        known_params = {**(before.params if before else {}), **params}
        known_envs = {**(before.envs if before else {}), **envs}
        index = SweepIndex(
            now,
            entries,
            {r.config_id: known_params[r.config_id] for r in runs},
            {r.env_id: known_envs[r.env_id] for r in runs},
        )
        if before is None or parsed[sweep] or set(kept) != set(entries):
            write_framed(root / sweep / INDEX, _code(), msgspec.msgpack.encode(index))
        out[sweep] = index
    return out


def load_store(root: Path, sweep: str = "*") -> Store:
    """Every record under ``root`` (of one sweep, or all), sorted by path, with the statistics
    memo of ``root``: from the index, reading only what changed."""
    files = ResultsStore(root)
    files.require(sweep)
    indexes = _refresh(root, files.sweeps() if sweep == "*" else [sweep])
    store = Store(root, 0, [], [], [], {}, {}, memo=Memo.beside(root))
    contents = hashlib.blake2b(digest_size=16)
    for index in indexes.values():  # sweeps in order, each sorted by path
        store.n_files += len(index.entries)
        store.params.update(index.params)
        store.envs.update(index.envs)
        for rel, entry in index.entries.items():
            contents.update(f"{rel}\0{entry.digest}\n".encode())
            if entry.run is not None:
                store.runs.append(entry.run)
            elif entry.malformed is not None:
                store.malformed.append((rel, entry.malformed))
            else:
                store.corrupt.append((rel, entry.corrupt or ""))
    store.contents = contents.hexdigest()
    if not store.n_files:
        where = f"{root}/{sweep}/runs/<run_id>.json" if sweep != "*" else f"{root}/<sweep>/runs/<run_id>.json"
        raise HarnessError(f"no run records in {root} (expected {where})")
    return store


def load_stores(roots: Sequence[Path], sweep: str = "*") -> Store:
    """Read several results directories as one: the same study made in different environments
    (on two machines, say) lines up by sweep, model, category, configuration and seed."""
    store = load_store(roots[0], sweep)
    for root in roots[1:]:
        if root.resolve() in {r.resolve() for r in store.roots or [store.root]}:
            raise HarnessError(f"{root} is given twice")
        store.merge(load_store(root, sweep))
    return store
