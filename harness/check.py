"""The reproducibility checker: verdicts from the results store alone.

It reads run records and nothing else (no torch, anomalib, Ray or W&B), so a check or a
report can be rebuilt anywhere. Every number it prints is itself reproducible: bootstraps
draw from a fixed seed, and each group's resamples depend only on its own sizes, so adding
a sweep to the store never changes another group's interval.

Semantics (DESIGN.md): runs group by everything but seed and repeat; a seed counts once
(its repeats are the determinism test, not extra samples); trials of a search are not test
runs and only feed the search summary.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.record import RECORD_SCHEMA
from harness.store import ResultsStore

CHECK_SCHEMA = "harness.check/1"
QUALITY = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Max")
COST = ("fit_s", "peak_rss_bytes", "peak_gpu_bytes")
COMPARED = ("image_AUROC", "pixel_AUROC")
DEFAULT_TOLERANCE = 1e-3  # absolute, per quality metric: below the third decimal anyone reports
BOOTSTRAP_SEED = 0
N_RESAMPLES = 9999
CONFIDENCE = 0.95
MIN_SEEDS_TO_COMPARE = 3
ALL_PAIRS_UP_TO = 8  # groups in a category; with more, each is compared with the best
MEANINGFUL = 0.75  # P(A>B) a difference must reach to matter (Bouthillier et al., MLSys 2021)
_PARALLEL_MIN_FILES = 2000  # below this, worker start-up costs more than it saves
_ROWS_PER_BOOTSTRAP = 512  # rows resampled at once: bounds memory at rows x resamples x n

_SEVERITY = {"untested": -1, "bitwise": 0, "within_tolerance": 1, "diverged": 2, "differs": 2}


# --- reading -----------------------------------------------------------------------------


class _Predictions(msgspec.Struct):
    scores_sha256: str
    maps_sha256: str | None
    image_scores: list[float]
    image_paths: msgspec.Raw  # only compared (hashed), never built


class _Timing(msgspec.Struct):
    fit_s: float | None


class _Memory(msgspec.Struct):
    peak_rss_bytes: int
    peak_gpu_bytes: int | None = None


class _Data(msgspec.Struct):
    root: str
    n_test: int | None = None


class _Validation(msgspec.Struct):
    curve: list[dict[str, float | None]]
    stopped_early: bool = False


class _Doc(msgspec.Struct):
    """The fields the checker reads (the full record is ``harness.record.RunRecord``).

    Unknown fields are skipped without being built (a record's scores and paths are most of
    its bytes); params and environment stay raw bytes until a new one is seen.
    """

    schema: str
    run_id: str
    sweep: str
    study: str
    model: str
    params: msgspec.Raw
    category: str
    seed: int
    repeat: int
    status: Literal["ok", "failed"]
    error: str | None
    metrics: dict[str, float | None]
    predictions: _Predictions | None
    timing: _Timing
    memory: _Memory
    data: _Data
    environment: msgspec.Raw
    started_at: str
    finished_at: str
    role: Literal["run", "trial", "best"] = "run"
    selection: dict[str, Any] | None = None
    validation: _Validation | None = None


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
    error: str | None
    config_id: str  # hash of the settings, content hashes left out
    data_sha256: str | None  # the images' content hash (None if the run failed before reading them)
    env_id: str
    hardware_id: str
    metrics: dict[str, float]
    scores_sha256: str | None
    maps_sha256: str | None
    scores: bytes | None  # raw float64 scores: how far two runs apart, when their hashes differ
    images_id: str | None  # hash of the test image list: scores line up only when it is equal
    started_at: str
    finished_at: str
    data_root: str
    n_test: int | None
    selection: dict[str, Any] | None
    curve: dict[str, list[float | None]] | None  # trials: validation metrics by epoch, by column
    stopped_early: bool

    def score_array(self) -> np.ndarray | None:
        return None if self.scores is None else np.frombuffer(self.scores, dtype=np.float64)


@dataclass
class Store:
    """Everything read from a results directory."""

    root: Path
    n_files: int
    runs: list[Run]
    malformed: list[tuple[str, str]]  # (path, why)
    params: dict[str, dict[str, Any]]  # config_id -> params
    envs: dict[str, dict[str, Any]]  # env_id -> environment
    _env_diffs: dict[tuple[str, str], dict[str, list[Any]]] = field(default_factory=dict, repr=False)

    def env_diff(self, a: str, b: str) -> dict[str, list[Any]]:
        """What differs between two environments, worked out once per pair of them."""
        if (a, b) not in self._env_diffs:
            self._env_diffs[(a, b)] = fingerprint_diff(self.envs[a], self.envs[b])
        return self._env_diffs[(a, b)]


def _reduce(doc: _Doc, rel: str, config: tuple[str, str | None], env: tuple[str, str]) -> Run:
    if doc.schema != RECORD_SCHEMA:
        raise ValueError(f"unknown schema {doc.schema!r} (expected {RECORD_SCHEMA!r})")
    if doc.run_id != rel.rsplit("/", 1)[-1].removesuffix(".json"):
        raise ValueError(f"run_id {doc.run_id!r} does not match the file name")
    if doc.status == "ok" and doc.role != "trial" and doc.predictions is None:
        raise ValueError("an ok run without predictions")
    metrics = {k: v for k, v in doc.metrics.items() if v is not None}
    if doc.status == "ok":
        cost = {"fit_s": doc.timing.fit_s, "peak_rss_bytes": doc.memory.peak_rss_bytes}
        cost["peak_gpu_bytes"] = doc.memory.peak_gpu_bytes
        metrics.update({k: float(v) for k, v in cost.items() if v is not None})
    pred = doc.predictions
    return Run(
        path=rel,
        run_id=doc.run_id,
        sweep=doc.sweep,
        model=doc.model,
        category=doc.category,
        seed=doc.seed,
        repeat=doc.repeat,
        role=doc.role,
        status=doc.status,
        error=doc.error.strip().splitlines()[0] if doc.error and doc.error.strip() else None,
        config_id=config[0],
        data_sha256=config[1],
        metrics=metrics,
        scores_sha256=pred.scores_sha256 if pred else None,
        maps_sha256=pred.maps_sha256 if pred else None,
        scores=np.asarray(pred.image_scores, dtype=np.float64).tobytes() if pred else None,
        images_id=hashlib.sha1(bytes(pred.image_paths)).hexdigest() if pred else None,
        env_id=env[0],
        hardware_id=env[1],
        started_at=doc.started_at,
        finished_at=doc.finished_at,
        data_root=doc.data.root,
        n_test=doc.data.n_test,
        selection=doc.selection,
        curve=_columns(doc.validation.curve) if doc.validation else None,
        stopped_early=doc.validation.stopped_early if doc.validation else False,
    )


def _columns(rows: list[dict[str, float | None]]) -> dict[str, list[float | None]]:
    """Per-epoch dicts as columns: a tenth of the objects to build and pass between processes."""
    keys = sorted({k for row in rows for k in row})
    return {k: [row.get(k) for row in rows] for k in keys}


_Parsed = tuple[list[Run], list[tuple[str, str]], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]
_DECODER = msgspec.json.Decoder(_Doc)
_PARSED = msgspec.msgpack.Decoder(_Parsed)


def _parse_files(root: str, rels: Sequence[str]) -> _Parsed:
    """Parse a chunk of record files; one bad file is named and skipped, never fatal."""
    runs: list[Run] = []
    bad: list[tuple[str, str]] = []
    params: dict[str, dict[str, Any]] = {}
    envs: dict[str, dict[str, Any]] = {}
    # Raw bytes of a params or environment block -> its ids: decoded once per distinct block.
    config_ids: dict[bytes, tuple[str, str | None]] = {}
    env_ids: dict[bytes, tuple[str, str]] = {}
    for rel in rels:
        try:
            doc = _DECODER.decode(read_bytes(os.path.join(root, rel)))
            raw_params, raw_env = bytes(doc.params), bytes(doc.environment)
            if raw_params not in config_ids:
                value = _object(raw_params, "params")
                config_ids[raw_params] = _settings_id(value)
                params.setdefault(config_ids[raw_params][0], value)
            if raw_env not in env_ids:
                value = _object(raw_env, "environment")
                hardware_id = value.get("hardware_id")
                if not isinstance(hardware_id, str) or not hardware_id:
                    raise ValueError("environment.hardware_id: missing or not a string")
                env_ids[raw_env] = (stable_hash(value, 12), hardware_id)
                envs.setdefault(env_ids[raw_env][0], value)
            runs.append(_reduce(doc, rel, config_ids[raw_params], env_ids[raw_env]))
        except (OSError, ValueError) as exc:  # msgspec's errors are ValueErrors, one line each
            bad.append((rel, str(exc).replace("JSON is malformed: ", "not valid JSON: ")))
    return runs, bad, params, envs


def read_bytes(path: str) -> bytes:
    """A whole small file, in as few system calls as possible (``open().read()`` costs 3x here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = [os.read(fd, 1 << 16)]
        while len(chunks[-1]) == 1 << 16:
            chunks.append(os.read(fd, 1 << 20))
    finally:
        os.close(fd)
    return b"".join(chunks)


def _object(raw: bytes, name: str) -> dict[str, Any]:
    value = msgspec.json.decode(raw)
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected an object")
    return value


CONTENT_HASHES = {"data": "sha256", "model_args": "weights_sha256"}


def _settings_id(params: dict[str, Any]) -> tuple[str, str | None]:
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


def _parse_encoded(root: str, rels: Sequence[str]) -> bytes:
    """``_parse_files`` for a worker process: msgpack crosses back 5x faster than pickle."""
    return msgspec.msgpack.encode(_parse_files(root, rels))


def load_store(root: Path, sweep: str = "*") -> Store:
    """Read every record under ``root`` (of one sweep, or all; in worker processes for large
    stores), sorted by path."""
    if not root.is_dir():
        raise HarnessError(f"results directory {root} does not exist")
    rels = ResultsStore(root).relpaths(sweep)
    if not rels:
        where = f"{root}/{sweep}/runs/<run_id>.json" if sweep != "*" else f"{root}/<sweep>/runs/<run_id>.json"
        raise HarnessError(f"no run records in {root} (expected {where})")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cpus, 8) if len(rels) >= _PARALLEL_MIN_FILES else 1
    if workers > 1:
        step = -(-len(rels) // (workers * 4))
        chunks = [rels[i : i + step] for i in range(0, len(rels), step)]
        with ProcessPoolExecutor(workers) as pool:
            parts = [_PARSED.decode(b) for b in pool.map(_parse_encoded, [str(root)] * len(chunks), chunks)]
    else:
        parts = [_parse_files(str(root), rels)]
    store = Store(root, len(rels), [], [], {}, {})
    for runs, bad, params, envs in parts:  # chunks are in path order, so runs stay sorted
        store.runs += runs
        store.malformed += bad
        store.params.update(params)
        store.envs.update(envs)
    return store


# --- statistics --------------------------------------------------------------------------


@dataclass
class Stat:
    """Seed variance of one metric in one group: one value per seed."""

    values: np.ndarray  # by seed, ascending
    seeds: np.ndarray  # the seed of each value
    ci_low: float | None = None
    ci_high: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def std(self) -> float | None:
        return float(self.values.std(ddof=1)) if self.n > 1 else None

    @property
    def cv(self) -> float | None:
        std, mean = self.std, self.mean
        return None if std is None or mean == 0 else std / abs(mean)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "min": float(self.values.min()),
            "max": float(self.values.max()),
            "cv": self.cv,
        }


def bootstrap_means(stats: Iterable[Stat]) -> None:
    """Fill each stat's 95% CI of the mean: scipy's BCa bootstrap, seeded, batched by size.

    scipy draws one index matrix per call and applies it to every row, so a row's interval
    depends only on its own values, never on which other rows share the call.
    """
    from scipy.stats import bootstrap

    by_n: dict[int, list[Stat]] = defaultdict(list)
    for s in stats:
        if s.n < 2:
            continue
        if np.allclose(s.values, s.values[0], rtol=1e-12, atol=0):  # every seed equal (to rounding)
            s.ci_low, s.ci_high = float(s.values.min()), float(s.values.max())
        else:
            by_n[s.n].append(s)
    for n, group in sorted(by_n.items()):
        for start in range(0, len(group), _ROWS_PER_BOOTSTRAP):
            chunk = group[start : start + _ROWS_PER_BOOTSTRAP]
            data = np.stack([s.values for s in chunk])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tiny n: scipy warns, the interval stands
                res = bootstrap(
                    (data,),
                    np.mean,
                    axis=-1,
                    vectorized=True,
                    n_resamples=N_RESAMPLES,
                    confidence_level=CONFIDENCE,
                    method="BCa",
                    batch=max(1, 2_000_000 // (len(chunk) * n)),
                    rng=np.random.default_rng(BOOTSTRAP_SEED),
                )
            lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
            for s, a, b in zip(chunk, lo, hi, strict=True):
                s.ci_low, s.ci_high = float(a), float(b)
                if not (math.isfinite(s.ci_low) and math.isfinite(s.ci_high)):  # BCa undefined: say so
                    s.ci_low = s.ci_high = None


def probability_of_improvement(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, float, float]]:
    """P(a seed of A scores above a seed of B), ties half, with a seeded percentile bootstrap CI.

    Each resample redraws the seeds of A and of B independently. With multinomial weights,
    every resample's statistic is a bilinear form over the pairwise win table, so pairs of
    equal sizes share their weights (seeded by the sizes: a pair's interval never depends on
    the others) and go through one batched matrix product. Weights and wins are small
    integers and halves, exact in float32.
    """
    out: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(pairs)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (a, b) in enumerate(pairs):
        by_size[(len(a), len(b))].append(i)
    tail = (1 - CONFIDENCE) / 2 * 100
    for (na, nb), members in by_size.items():
        rng = np.random.default_rng([BOOTSTRAP_SEED, na, nb])
        wa = rng.multinomial(na, np.full(na, 1 / na), size=N_RESAMPLES).astype(np.float32)
        wb = rng.multinomial(nb, np.full(nb, 1 / nb), size=N_RESAMPLES).astype(np.float32)
        for start in range(0, len(members), 64):
            chunk = members[start : start + 64]
            wins = np.stack(
                [(pairs[i][0][:, None] > pairs[i][1]) + 0.5 * (pairs[i][0][:, None] == pairs[i][1]) for i in chunk]
            )
            boot = ((wa @ wins.astype(np.float32)) * wb).sum(-1, dtype=np.float64) / (na * nb)  # pairs x resamples
            lo, hi = np.percentile(boot, [tail, 100 - tail], axis=-1)
            for k, i in enumerate(chunk):
                out[i] = (float(wins[k].mean()), float(lo[k]), float(hi[k]))
    return out


def comparison_verdict(p: float, lo: float, hi: float, n_a: int, n_b: int) -> str:
    if min(n_a, n_b) < MIN_SEEDS_TO_COMPARE:
        return "too few seeds"
    if lo > 0.5 and p >= MEANINGFUL:
        return "A better"
    if hi < 0.5 and p <= 1 - MEANINGFUL:
        return "B better"
    return "within noise"


# --- verdicts ----------------------------------------------------------------------------


@dataclass
class Pair:
    """Two runs that should agree: same seed, on the same hardware (determinism) or not."""

    a: Run
    b: Run
    verdict: str
    metric_diffs: dict[str, float]  # b - a, per quality metric both have
    max_score_diff: float | None = None
    env_diff: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def max_metric_diff(self) -> float:
        return max((abs(v) for v in self.metric_diffs.values()), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.a.seed,
            "hardware_id": self.a.hardware_id,
            "run_a": self.a.run_id,
            "run_b": self.b.run_id,
            "repeat_a": self.a.repeat,
            "repeat_b": self.b.repeat,
            "verdict": self.verdict,
            "max_score_diff": self.max_score_diff,
            "max_metric_diff": self.max_metric_diff,
            "metric_diffs": self.metric_diffs,
            "env_diff": self.env_diff,
        }


def _pair(a: Run, b: Run, tolerance: float, store: Store, differs: str) -> Pair:
    diffs = {m: b.metrics[m] - a.metrics[m] for m in QUALITY if m in a.metrics and m in b.metrics}
    same_metrics = {m for m in QUALITY if m in a.metrics} == {m for m in QUALITY if m in b.metrics}
    if a.scores_sha256 == b.scores_sha256 and a.maps_sha256 == b.maps_sha256:
        verdict = "bitwise"
    elif diffs and same_metrics and all(abs(d) <= tolerance for d in diffs.values()):
        verdict = "within_tolerance"
    else:
        verdict = differs
    score_diff = 0.0 if verdict == "bitwise" else _score_diff(a, b)
    return Pair(a, b, verdict, diffs, score_diff, store.env_diff(a.env_id, b.env_id))


def _worst(pairs: list[Pair]) -> str:
    return max((p.verdict for p in pairs), key=_SEVERITY.__getitem__, default="untested")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys, the way ``--set`` names them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """Environment keys whose values differ (nested keys dotted), as [a, b]."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted((set(fa) | set(fb)) - {"hardware_id"})
    return {k: [fa.get(k), fb.get(k)] for k in keys if fa.get(k) != fb.get(k)}


@dataclass
class Determinism:
    pairs: list[Pair]

    @property
    def verdict(self) -> str:
        return _worst(self.pairs)

    def summary(self) -> str | None:
        """One line on the pairs that are not bitwise equal, naming the worst; None if there are none."""
        differing = [p for p in self.pairs if p.verdict != "bitwise"]
        if not differing:
            return None
        worst = max(differing, key=lambda p: (_SEVERITY[p.verdict], p.max_metric_diff, p.max_score_diff or 0.0))
        return f"{len(differing)} of {len(self.pairs)} pairs differ; worst: {describe_pair(worst)}"

    def to_json(self) -> dict[str, Any]:
        counts = {v: sum(p.verdict == v for p in self.pairs) for v in ("bitwise", "within_tolerance", "diverged")}
        scored = [p.max_score_diff for p in self.pairs if p.max_score_diff is not None]
        return {
            "verdict": self.verdict,
            "pairs": len(self.pairs),
            **counts,
            "max_score_diff": max(scored, default=None),
            "max_metric_diff": max((p.max_metric_diff for p in self.pairs), default=None),
            "differing": [p.to_json() for p in self.pairs if p.verdict != "bitwise"],
        }


@dataclass
class CrossHardware:
    hardware_a: str
    hardware_b: str
    pairs: list[Pair]  # one per shared seed: the lowest repeat on each side
    seed_std: float | None  # the group's image AUROC std over seeds, to size the deltas against

    @property
    def verdict(self) -> str:
        return _worst(self.pairs)

    def deltas(self) -> dict[str, dict[str, float]]:
        out = {}
        for m in QUALITY:
            d = [p.metric_diffs[m] for p in self.pairs if m in p.metric_diffs]
            if d:
                out[m] = {"mean": float(np.mean(d)), "max_abs": float(np.max(np.abs(d)))}
        return out

    def to_json(self) -> dict[str, Any]:
        deltas = self.deltas()
        abs_deltas = [abs(p.metric_diffs["image_AUROC"]) for p in self.pairs if "image_AUROC" in p.metric_diffs]
        ratio = float(np.mean(abs_deltas)) / self.seed_std if abs_deltas and self.seed_std else None
        differs: dict[str, list[Any]] = {}
        for p in self.pairs:  # every field that differs on any seed, first seen values
            for k, v in p.env_diff.items():
                differs.setdefault(k, v)
        return {
            "hardware_a": self.hardware_a,
            "hardware_b": self.hardware_b,
            "seeds": [p.a.seed for p in self.pairs],
            "verdict": self.verdict,
            "deltas": deltas,
            "delta_over_seed_std": ratio,
            "max_score_diff": max((p.max_score_diff for p in self.pairs if p.max_score_diff is not None), default=None),
            "fingerprint_diff": dict(sorted(differs.items())),
        }


@dataclass
class Group:
    """Runs that differ only in seed and repeat: one model, config and category of one sweep."""

    sweep: str
    model: str
    category: str
    role: str
    config_id: str
    label: str
    ok: list[Run]
    failed: list[Run]
    stats: dict[str, Stat] = field(default_factory=dict)
    determinism: Determinism = field(default_factory=lambda: Determinism([]))
    cross_hardware: list[CrossHardware] = field(default_factory=list)

    @property
    def id(self) -> str:
        return stable_hash([self.sweep, self.model, self.category, self.role, self.config_id], 12)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.ok})

    @property
    def data_sha256(self) -> list[str]:
        """The content hashes of the images its runs read: one, unless the data changed."""
        return sorted({r.data_sha256 for r in self.ok if r.data_sha256})

    @property
    def selection(self) -> dict[str, Any] | None:
        """How a search chose this configuration (best-config groups only)."""
        return next((r.selection for r in (*self.ok, *self.failed) if r.selection), None)

    @property
    def note(self) -> str | None:
        if not self.ok:
            return "no successful run"
        if len(self.data_sha256) > 1:
            return f"the images changed during the study: {len(self.data_sha256)} versions (data.sha256)"
        return "single seed: no spread to report" if len(self.seeds) == 1 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "sweep": self.sweep,
            "model": self.model,
            "category": self.category,
            "role": self.role,
            "config_id": self.config_id,
            "n_runs": len(self.ok),
            "seeds": self.seeds,
            "repeats": max(Counter((r.seed, r.hardware_id) for r in self.ok).values(), default=0),
            "data_sha256": self.data_sha256,
            "hardware_ids": sorted({r.hardware_id for r in self.ok}),
            "note": self.note,
            "failed": [
                {"run_id": r.run_id, "seed": r.seed, "repeat": r.repeat, "error": r.error, "path": r.path}
                for r in self.failed
            ],
            "metrics": {m: s.to_json() for m, s in self.stats.items()},
            "determinism": self.determinism.to_json(),
            "cross_hardware": [c.to_json() for c in self.cross_hardware],
        }


@dataclass
class Comparison:
    category: str
    metric: str
    a: Group
    b: Group
    p: float
    ci_low: float
    ci_high: float

    @property
    def verdict(self) -> str:
        return comparison_verdict(
            self.p, self.ci_low, self.ci_high, self.a.stats[self.metric].n, self.b.stats[self.metric].n
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "metric": self.metric,
            "a": self.a.label,
            "b": self.b.label,
            "n_a": self.a.stats[self.metric].n,
            "n_b": self.b.stats[self.metric].n,
            "p_a_better": self.p,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "verdict": self.verdict,
        }


_SELECTION_FIELDS = {
    "metric": "metric",
    "mode": "mode",
    "val_score": "value",
    "trial_run_id": "trial_run_id",
    "config": "config",
    "rule": "rule",
}


@dataclass
class Search:
    """One HPO search (a sweep's trials for one model and category) and what it selected."""

    sweep: str
    model: str
    category: str
    trials: list[Run]
    best: list[Group]  # best-config groups it led to (more than one if a rerun chose again)

    def to_json(self) -> dict[str, Any]:
        ok = [t for t in self.trials if t.status == "ok"]
        return {
            "sweep": self.sweep,
            "model": self.model,
            "category": self.category,
            "n_trials": len(self.trials),
            "n_ok": len(ok),
            "n_failed": len(self.trials) - len(ok),
            "n_stopped_early": sum(t.stopped_early for t in ok),
            "selections": [
                {"group": g.label} | {key: (g.selection or {}).get(field) for key, field in _SELECTION_FIELDS.items()}
                for g in self.best
            ],
        }


@dataclass
class CheckReport:
    """The checker's answer; ``to_json`` is the documented ``--json`` document."""

    store: Store
    tolerance: float
    groups: list[Group]
    comparisons: list[Comparison]
    searches: list[Search]

    @property
    def diverged(self) -> list[Group]:
        return [g for g in self.groups if g.determinism.verdict == "diverged"]

    def counts(self) -> dict[str, int]:
        runs = self.store.runs
        return {
            "files": self.store.n_files,
            "ok": sum(r.status == "ok" and r.role != "trial" for r in runs),
            "failed": sum(r.status == "failed" and r.role != "trial" for r in runs),
            "trials": sum(r.role == "trial" for r in runs),
            "malformed": len(self.store.malformed),
        }

    def determinism_counts(self) -> dict[str, int]:
        """Groups per determinism verdict."""
        return {
            v: sum(g.determinism.verdict == v for g in self.groups)
            for v in ("bitwise", "within_tolerance", "diverged", "untested")
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": CHECK_SCHEMA,
            "tolerance": self.tolerance,
            "records": self.counts(),
            "malformed": [{"path": p, "error": e} for p, e in self.store.malformed],
            "determinism": self.determinism_counts(),
            "groups": [g.to_json() for g in self.groups],
            "comparisons": [c.to_json() for c in self.comparisons],
            "searches": [s.to_json() for s in self.searches],
        }

    def json_text(self) -> str:
        """What ``harness check --json`` prints: sorted keys, indented (msgspec writes 7 MB of
        it in a tenth of json.dumps' time)."""
        return msgspec.json.format(msgspec.json.encode(self.to_json(), order="sorted"), indent=2).decode() + "\n"


def _label(run: Run, config_id: str, several: bool) -> str:
    label = f"{run.sweep}/{run.model}" + (" [best]" if run.role == "best" else "")
    return f"{label} #{config_id[:6]}" if several else label


def _groups(store: Store) -> list[Group]:
    members: dict[tuple[str, str, str, str, str], list[Run]] = defaultdict(list)
    for run in store.runs:
        if run.role != "trial":
            members[(run.sweep, run.model, run.category, run.role, run.config_id)].append(run)
    configs: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for sweep, model, category, role, _ in members:
        configs[(sweep, model, category, role)] += 1
    groups = []
    for key, runs in sorted(members.items()):
        runs.sort(key=lambda r: (r.seed, r.repeat, r.hardware_id, r.run_id))
        label = _label(runs[0], key[4], configs[key[:4]] > 1)
        ok = [r for r in runs if r.status == "ok"]
        groups.append(Group(*key, label, ok, [r for r in runs if r.status == "failed"]))
    return sorted(groups, key=lambda g: (g.category, g.label))


def _seed_stats(group: Group) -> dict[str, Stat]:
    per_seed: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in group.ok:
        for m, v in run.metrics.items():
            per_seed[m][run.seed].append(v)
    stats = {}
    for m in (*QUALITY, *COST):
        if m in per_seed:
            by_seed = sorted(per_seed[m].items())
            stats[m] = Stat(np.array([sum(v) / len(v) for _, v in by_seed]), np.array([s for s, _ in by_seed]))
    return stats


def _score_diff(a: Run, b: Run) -> float | None:
    sa, sb = a.score_array(), b.score_array()
    if sa is None or sb is None or a.images_id != b.images_id:
        return None  # different test images: scores do not line up
    return float(np.max(np.abs(sa - sb), initial=0.0))


def _determinism(group: Group, store: Store, tolerance: float) -> Determinism:
    by_key: dict[tuple[int, str], list[Run]] = defaultdict(list)
    for run in group.ok:
        by_key[(run.seed, run.hardware_id)].append(run)
    pairs = []
    for _, runs in sorted(by_key.items()):
        first = min(runs, key=lambda r: (r.repeat, r.run_id))
        pairs += [_pair(first, r, tolerance, store, "diverged") for r in runs if r is not first]
    return Determinism(pairs)


def _cross_hardware(group: Group, store: Store, tolerance: float) -> list[CrossHardware]:
    first: dict[str, dict[int, Run]] = defaultdict(dict)
    for run in sorted(group.ok, key=lambda r: (r.repeat, r.run_id), reverse=True):
        first[run.hardware_id][run.seed] = run  # the lowest repeat wins
    std = group.stats["image_AUROC"].std if "image_AUROC" in group.stats else None
    out = []
    for ha, hb in combinations(sorted(first), 2):
        shared = sorted(set(first[ha]) & set(first[hb]))
        if shared:
            pairs = [_pair(first[ha][s], first[hb][s], tolerance, store, "differs") for s in shared]
            out.append(CrossHardware(ha, hb, pairs, std))
    return out


def _comparisons(groups: list[Group]) -> list[Comparison]:
    """Pairs of groups of a category that saw the same data, per compared metric.

    Every pair while a category has up to ALL_PAIRS_UP_TO groups; beyond that, each group
    against the best by mean image AUROC (the question a long list asks: which are tied with it).
    """
    by_data: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in groups:
        if g.ok and len(g.data_sha256) == 1:  # unknown or changed data: nothing to compare with
            by_data[(g.category, g.data_sha256[0])].append(g)
    todo: list[tuple[str, str, Group, Group]] = []
    for (category, _), members in sorted(by_data.items()):
        if len(members) <= ALL_PAIRS_UP_TO:
            pairs = list(combinations(members, 2))
        else:
            best = max(members, key=lambda g: g.stats["image_AUROC"].mean if "image_AUROC" in g.stats else -math.inf)
            pairs = [(best, g) for g in members if g is not best]
        todo += [(category, m, a, b) for a, b in pairs for m in COMPARED if m in a.stats and m in b.stats]
    results = probability_of_improvement([(a.stats[m].values, b.stats[m].values) for _, m, a, b in todo])
    return [Comparison(c, m, a, b, *res) for (c, m, a, b), res in zip(todo, results, strict=True)]


def _searches(store: Store, groups: list[Group]) -> list[Search]:
    trials: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in store.runs:
        if run.role == "trial":
            trials[(run.sweep, run.model, run.category)].append(run)
    best: dict[tuple[str, str, str], list[Group]] = defaultdict(list)
    for g in groups:
        if g.role == "best":
            best[(g.sweep, g.model, g.category)].append(g)
    return [Search(*key, trials.get(key, []), best.get(key, [])) for key in sorted(set(trials) | set(best))]


def check(root: Path, tolerance: float = DEFAULT_TOLERANCE, sweep: str = "*") -> CheckReport:
    """Read the store at ``root`` (one sweep of it, or all) and compute every verdict."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise HarnessError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    store = load_store(root, sweep)
    if not store.runs:
        path, error = store.malformed[0]
        raise HarnessError(
            f"no readable run record in {root}: {len(store.malformed)} malformed, such as {path}: {error}"
        )
    groups = _groups(store)
    for g in groups:
        g.stats = _seed_stats(g)
    bootstrap_means(s for g in groups for s in g.stats.values())
    for g in groups:
        g.determinism = _determinism(g, store, tolerance)
        g.cross_hardware = _cross_hardware(g, store, tolerance)

    return CheckReport(store, tolerance, groups, _comparisons(groups), _searches(store, groups))


# --- text output -------------------------------------------------------------------------


def fmt_stat(stat: Stat | None, digits: int = 3) -> str:
    """``mean±std [lo, hi]``; a single seed says so instead of a std of 0."""
    if stat is None:
        return "-"
    if stat.n == 1:
        return f"{stat.mean:.{digits}f} (1 seed)"
    ci = f" [{stat.ci_low:.{digits}f}, {stat.ci_high:.{digits}f}]" if stat.ci_low is not None else ""
    return f"{stat.mean:.{digits}f}±{stat.std:.{digits}f}{ci}"


def fmt_small(x: float | None) -> str:
    return "-" if x is None else ("0" if x == 0 else f"{x:.2g}")


def determinism_cell(group: Group) -> str:
    d = group.determinism
    tested = {(r.seed, r.hardware_id) for r in group.ok}
    lost = sum((r.seed, r.hardware_id) in tested for r in group.failed)
    failed = f"; {lost} repeat{'s' if lost > 1 else ''} failed" if lost else ""
    if d.verdict == "untested":
        return f"untested (no repeats{failed})"
    same = sum(p.verdict == "bitwise" for p in d.pairs)
    return f"{d.verdict} ({same}/{len(d.pairs)} pairs bitwise{failed})"


def fmt_value(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def failed_lines(groups: Iterable[Group]) -> list[str]:
    """One line per failed run: what it was, its error's first line, its file."""
    return [
        f"{g.label} {g.category} seed {r.seed} repeat {r.repeat}: {r.error} ({r.path})"
        for g in groups
        for r in g.failed
    ]


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def describe_pair(p: Pair) -> str:
    return (
        f"seed {p.a.seed} on {p.a.hardware_id}, repeat {p.a.repeat} vs {p.b.repeat}: {p.verdict}, "
        f"max metric diff {fmt_small(p.max_metric_diff)}, max score diff {fmt_small(p.max_score_diff)} "
        f"({p.a.run_id} vs {p.b.run_id})" + (f"; environment differs in {', '.join(p.env_diff)}" if p.env_diff else "")
    )


def to_text(rep: CheckReport) -> str:
    """The compact table ``harness check`` prints."""
    doc = rep.counts()
    lines = [
        f"checked {rep.store.root}: {doc['files']} records ({doc['ok']} ok, {doc['failed']} failed, "
        f"{doc['trials']} search trials), {doc['malformed']} malformed; tolerance {rep.tolerance:g}"
    ]
    rows = [
        (
            g.category,
            g.label,
            str(len(g.seeds)),
            fmt_stat(g.stats.get("image_AUROC")),
            fmt_stat(g.stats.get("pixel_AUROC")),
            determinism_cell(g) if g.ok else "-",
            str(len(g.failed)),
        )
        for g in rep.groups
    ]
    header = ("category", "group", "seeds", "image_AUROC mean±std [95% CI]", "pixel_AUROC", "determinism", "failed")
    lines += ["", *text_table(header, rows)] if rows else ["", "no test runs (only search trials)"]
    failed = failed_lines(rep.groups)
    if failed:
        lines += ["", "failed runs (in no statistic):", *("  " + line for line in failed)]
    differing = [f"  {g.label} {g.category}: {line}" for g in rep.groups if (line := g.determinism.summary())]
    if differing:
        lines += ["", "same seed, same hardware, different scores (--json lists every pair):", *differing]
    cross = [(g, c) for g in rep.groups for c in g.cross_hardware]
    if cross:
        lines += ["", "across hardware (same seeds):"]
        for g, c in cross:
            doc_c = c.to_json()
            auroc = doc_c["deltas"].get("image_AUROC")
            delta = f"; image_AUROC delta {auroc['mean']:+.4f} (max {auroc['max_abs']:.4f})" if auroc else ""
            lines.append(
                f"  {g.label} {g.category} {c.hardware_a} vs {c.hardware_b}, {len(c.pairs)} seeds: {c.verdict}"
                f"{delta}; environment differs in {', '.join(doc_c['fingerprint_diff']) or 'nothing recorded'}"
            )
    if rep.comparisons:
        lines += ["", "model comparison, P(A beats B) over seeds [95% CI]:"]
        pairs = [
            (c.category, c.metric, c.a.label, c.b.label, f"{c.p:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}]", c.verdict)
            for c in rep.comparisons
        ]
        lines += ["  " + line for line in text_table(("category", "metric", "A", "B", "P(A>B)", "verdict"), pairs)]
    for s in rep.searches:
        doc_s = s.to_json()
        head = (
            f"search {s.sweep}/{s.model} {s.category}: {doc_s['n_trials']} trials ({doc_s['n_ok']} ok, "
            f"{doc_s['n_failed']} failed, {doc_s['n_stopped_early']} stopped early)"
        )
        for g in s.best:
            sel = g.selection or {}
            test = fmt_stat(g.stats.get("image_AUROC"))
            head += f"; best {sel.get('metric')} {fmt_value(sel.get('value'))} -> test image_AUROC {test}"
        lines += ["", head]
    return "\n".join(lines) + "\n"
