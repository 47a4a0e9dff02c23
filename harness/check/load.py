"""Reading a results store for the checker: record files to ``Run``s (``index`` decides which
files need reading, and reads them in worker processes).

It reads run records and nothing else (no torch, anomalib, Ray or W&B), so a check or a
report can be rebuilt anywhere. Each record is decoded with the one record schema
(``harness.record``), verified against its own scores (``verify``: a corrupt one is named
and left out), and reduced to a ``Run``: what the verdicts need, with params and
environments shared by id (a store of 100,000 records holds a few dozen of each).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from harness.check.memo import Memo
from harness.check.verify import verify
from harness.formatting import flatten
from harness.hashing import stable_hash
from harness.record import RunRecord, SeedsPlan, decode_record

COST = ("fit_s", "peak_rss_bytes", "peak_gpu_bytes")
# Content hashes inside params: left out of a configuration's id (see ``settings_id``).
CONTENT_HASHES = {"data": "sha256", "model_args": "weights_sha256"}
# Ids hashed from the other fields, and the study's name for an environment: a difference in
# them says nothing the fields do not.
IDS = {"hardware_id", "machine_id", "environment_id", "variant"}
_VERIFY_BLOCK = 4096  # records decoded, then verified together, at a time (about 50 MB of them)


class Run(msgspec.Struct, frozen=True):
    """One record, reduced to what verdicts need (params and environments are shared by id)."""

    path: str  # relative to the store root
    run_id: str
    sweep: str
    model: str
    category: str
    seed: int
    repeat: int
    role: str
    status: str
    error: str | None  # its first line
    config_id: str  # hash of the settings, content hashes left out
    data_sha256: str | None  # the images' content hash (None if the run failed before reading them)
    env_id: str  # hash of the whole environment record (host and commit included)
    environment_id: str  # the execution environment: pairs with equal ids test determinism
    machine_id: str | None  # the physical machine (None in records from before it was recorded)
    variant: str | None  # the study's name for the environment, if it named one
    metrics: dict[str, float]  # quality metrics and, for ok runs, the COST figures
    scores_sha256: str | None
    maps_sha256: str | None
    scores: bytes | None  # raw float64 scores: how far two runs apart, when their hashes differ
    images_id: str | None  # hash of the test image list: scores line up only when it is equal
    started_at: str
    finished_at: str
    data_root: str
    n_test: int | None
    selection: dict[str, Any] | None
    seeds_plan: SeedsPlan | None  # an adaptive seed study's rounds
    curve: dict[str, list[int | float | None]] | None  # trials: validation metrics by epoch, by column
    stopped_early: bool

    def score_array(self) -> np.ndarray | None:
        return None if self.scores is None else np.frombuffer(self.scores, dtype=np.float64)


@dataclass
class Store:
    """Everything read from a results directory (or several, lined up: see ``load_stores`` in
    ``index``), and the statistics already computed from such records (``memo``)."""

    root: Path  # the first of ``roots``
    n_files: int
    runs: list[Run]
    malformed: list[tuple[str, str]]  # (path, why): not a record
    corrupt: list[tuple[str, str]]  # (path, why): a record whose hash or metrics are not its scores'
    params: dict[str, dict[str, Any]]  # config_id -> params
    envs: dict[str, dict[str, Any]]  # env_id -> environment
    roots: list[Path] = field(default_factory=list)
    memo: Memo = field(default_factory=Memo)
    contents: str = ""  # a hash of every record file's path and bytes (``index.load_store``)
    _env_diffs: dict[tuple[str, str], dict[str, list[Any]]] = field(default_factory=dict, repr=False)

    def full(self, path: str) -> Path:
        """A record's path as a user can open it (merged stores' paths carry their directory)."""
        return Path(path) if self.roots else self.root / path

    @property
    def where(self) -> str:
        return " and ".join(str(r) for r in self.roots or [self.root])

    def merge(self, other: Store) -> None:
        """Add another store's records; paths of both are then prefixed by their directory."""
        if not self.roots:
            self.runs = _prefixed(self.runs, self.root)
            self.malformed = [(f"{self.root}/{p}", e) for p, e in self.malformed]
            self.corrupt = [(f"{self.root}/{p}", e) for p, e in self.corrupt]
            self.roots = [self.root]
        self.roots.append(other.root)
        self.contents = stable_hash([self.contents, str(other.root), other.contents])
        self.n_files += other.n_files
        self.runs += _prefixed(other.runs, other.root)
        self.malformed += [(f"{other.root}/{p}", e) for p, e in other.malformed]
        self.corrupt += [(f"{other.root}/{p}", e) for p, e in other.corrupt]
        self.params.update(other.params)
        self.envs.update(other.envs)

    def env_diff(self, a: str, b: str) -> dict[str, list[Any]]:
        """What differs between two environments, worked out once per pair of them."""
        if (a, b) not in self._env_diffs:
            self._env_diffs[(a, b)] = fingerprint_diff(self.envs[a], self.envs[b])
        return self._env_diffs[(a, b)]


def _prefixed(runs: list[Run], root: Path) -> list[Run]:
    return [msgspec.structs.replace(r, path=f"{root}/{r.path}") for r in runs]


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """Environment keys whose values differ (nested keys dotted), as [a, b]."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted((set(fa) | set(fb)) - IDS)
    return {k: [fa.get(k), fb.get(k)] for k in keys if fa.get(k) != fb.get(k)}


def settings_id(params: dict[str, Any]) -> tuple[str, str | None]:
    """The id of a configuration's settings, and its data's content hash.

    Content hashes are left out of the id: every category of one configuration shares it, and
    so does a run that failed before it could hash its data. The data hash is kept apart, so
    a study whose images changed half way is flagged rather than split.
    """
    settings = {
        k: {kk: vv for kk, vv in v.items() if kk != CONTENT_HASHES.get(k)} if isinstance(v, dict) else v
        for k, v in params.items()
    }
    data = params.get("data")
    sha = data.get("sha256") if isinstance(data, dict) else None
    return stable_hash(settings, 12), sha if isinstance(sha, str) else None


def _columns(rows: list[dict[str, int | float | None]]) -> dict[str, list[int | float | None]]:
    """Per-epoch dicts as columns: a tenth of the objects to build and pass between processes."""
    keys = sorted({k for row in rows for k in row})
    return {k: [row.get(k) for row in rows] for k in keys}


def identified(record: RunRecord, rel: str) -> str:
    """The record's environment id, once it is known to be the record its file name says it
    is (its run id), whole (an ok run has predictions) and placed (it has an environment id)."""
    if record.run_id != rel.rsplit("/", 1)[-1].removesuffix(".json"):
        raise ValueError(f"run_id {record.run_id!r} does not match the file name")
    if record.ok and record.role != "trial" and record.predictions is None:
        raise ValueError("an ok run without predictions")
    if not record.environment_id:
        raise ValueError("environment.environment_id: missing or not a string")
    return record.environment_id


class _Reducer:
    """Records to ``Run``s, with each distinct params, environment and image list hashed once."""

    _encode = msgspec.json.Encoder(order="sorted").encode

    def __init__(self) -> None:
        self.params: dict[str, dict[str, Any]] = {}
        self.envs: dict[str, dict[str, Any]] = {}
        self._configs: dict[bytes, tuple[str, str | None]] = {}
        self._envs: dict[bytes, str] = {}
        self._images: dict[tuple[str, ...], str] = {}

    def config(self, params: dict[str, Any]) -> tuple[str, str | None]:
        raw = self._encode(params)
        if raw not in self._configs:
            self._configs[raw] = settings_id(params)
            self.params.setdefault(self._configs[raw][0], params)
        return self._configs[raw]

    def env(self, environment: dict[str, Any]) -> str:
        raw = self._encode(environment)
        if raw not in self._envs:
            self._envs[raw] = stable_hash(environment, 12)
            self.envs.setdefault(self._envs[raw], environment)
        return self._envs[raw]

    def images(self, paths: list[str]) -> str:
        key = tuple(paths)
        if key not in self._images:
            self._images[key] = hashlib.sha1("\0".join(key).encode()).hexdigest()
        return self._images[key]

    def reduce(self, record: RunRecord, rel: str, environment_id: str) -> Run:
        metrics = {k: v for k, v in record.metrics.items() if v is not None}
        if record.ok:
            cost = {"fit_s": record.timing.fit_s, "peak_rss_bytes": record.memory.peak_rss_bytes}
            cost["peak_gpu_bytes"] = record.memory.peak_gpu_bytes
            metrics.update({k: float(v) for k, v in cost.items() if v is not None})
        pred, validation = record.predictions, record.validation
        config_id, data_sha256 = self.config(record.params)
        return Run(
            path=rel,
            run_id=record.run_id,
            sweep=record.sweep,
            model=record.model,
            category=record.category,
            seed=record.seed,
            repeat=record.repeat,
            role=record.role,
            status=record.status,
            error=record.first_error_line() or None,
            config_id=config_id,
            data_sha256=data_sha256,
            metrics=metrics,
            scores_sha256=pred.scores_sha256 if pred else None,
            maps_sha256=pred.maps_sha256 if pred else None,
            scores=np.asarray(pred.image_scores, dtype=np.float64).tobytes() if pred else None,
            images_id=self.images(pred.image_paths) if pred else None,
            env_id=self.env(record.environment),
            environment_id=environment_id,
            machine_id=record.machine_id,
            variant=record.variant,
            started_at=record.started_at,
            finished_at=record.finished_at,
            data_root=record.data.root,
            n_test=record.data.n_test,
            selection=record.selection,
            seeds_plan=record.seeds_plan,
            curve=_columns(validation.curve) if validation else None,
            stopped_early=validation.stopped_early if validation else False,
        )


class FileState(msgspec.Struct, array_like=True, frozen=True):
    """What says a record file changed without reading it: a rewrite through the store's
    atomic rename is a new inode; an edit in place changes the size or the times (the change
    time even when the modification time is set back: only the kernel sets it)."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileState:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Entry(msgspec.Struct, array_like=True):
    """What reading one record file gave: its ``Run``, or why it is malformed or corrupt.

    All three empty: the file's bytes hash as the entry it was read for (``parse_files``).
    """

    state: FileState
    digest: str  # blake2b of the file's bytes
    run: Run | None = None
    malformed: str | None = None
    corrupt: str | None = None

    @property
    def same(self) -> bool:
        return self.run is None and self.malformed is None and self.corrupt is None


Parsed = tuple[list[tuple[str, Entry]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]
_PARSED = msgspec.msgpack.Decoder(Parsed)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (the state before is restored after).

    Reading and checking 100,000 records builds millions of objects and no garbage cycles,
    and every full collection walks all of them again: 3 s of a 15 s check on this machine.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_files(root: str, todo: Sequence[tuple[str, str | None]]) -> Parsed:
    """Read, parse and verify record files; one bad file is named, never fatal.

    ``todo`` pairs each file with the digest its bytes had when last read (None: never): a
    file whose bytes still hash to it is not parsed again (its entry says ``same``).
    """
    entries: list[tuple[str, Entry]] = []
    reducer = _Reducer()
    with gc_paused():
        for start in range(0, len(todo), _VERIFY_BLOCK):
            read: list[tuple[str, Entry, RunRecord, str]] = []
            for rel, known in todo[start : start + _VERIFY_BLOCK]:
                try:
                    data, state = read_file(os.path.join(root, rel))
                except FileNotFoundError:
                    continue  # removed since it was listed
                except OSError as exc:
                    entries.append((rel, Entry(FileState(0, -1, 0, 0), "", malformed=str(exc))))
                    continue
                entry = Entry(state, hashlib.blake2b(data, digest_size=16).hexdigest())
                if entry.digest == known:
                    entries.append((rel, entry))
                    continue
                try:
                    record = decode_record(data)
                    read.append((rel, entry, record, identified(record, rel)))
                except ValueError as exc:  # msgspec's errors are ValueErrors, one line each
                    entry.malformed = str(exc).replace("JSON is malformed: ", "not valid JSON: ")
                    entries.append((rel, entry))
            wrong = verify([record for _, _, record, _ in read])
            for i, (rel, entry, record, env) in enumerate(read):
                if i in wrong:
                    entry.corrupt = wrong[i]
                else:
                    entry.run = reducer.reduce(record, rel, env)
                entries.append((rel, entry))
    return entries, reducer.params, reducer.envs


def parse_encoded(root: str, todo: Sequence[tuple[str, str | None]]) -> bytes:
    """``parse_files`` for a worker process: msgpack crosses back 5x faster than pickle."""
    return msgspec.msgpack.encode(parse_files(root, todo))


def decode_parsed(data: bytes) -> Parsed:
    return _PARSED.decode(data)


def read_file(path: str) -> tuple[bytes, FileState]:
    """A whole small file and the state of the very file read (not of what the path names a
    moment later), in as few system calls as possible (``open().read()`` costs 3x here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        state = FileState.of(os.fstat(fd))
        chunks = [os.read(fd, 1 << 16)]
        while len(chunks[-1]) == 1 << 16:
            chunks.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return b"".join(chunks), state
