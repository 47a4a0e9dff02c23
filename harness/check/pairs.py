"""Verdicts on pairs of runs that should agree: the same seed repeated on the same hardware
(determinism), or run on other hardware (cross-hardware).

A pair is ``bitwise`` (equal score and map hashes), ``within_tolerance`` (hashes differ,
every quality metric within the tolerance) or, beyond that, ``diverged`` (same hardware) /
``differs`` (other hardware).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.check.load import QUALITY, Run, Store
from harness.formatting import fmt_small

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_TOLERANCE = 1e-3  # absolute, per quality metric: below the third decimal anyone reports
VERDICTS = ("bitwise", "within_tolerance", "diverged")
_SEVERITY = {"untested": -1, "bitwise": 0, "within_tolerance": 1, "diverged": 2, "differs": 2}


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

    def describe(self) -> str:
        """One line: which runs, the verdict, how far apart, what differs in their environments."""
        return (
            f"seed {self.a.seed} on {self.a.hardware_id}, repeat {self.a.repeat} vs {self.b.repeat}: {self.verdict}, "
            f"max metric diff {fmt_small(self.max_metric_diff)}, max score diff {fmt_small(self.max_score_diff)} "
            f"({self.a.run_id} vs {self.b.run_id})"
            + (f"; environment differs in {', '.join(self.env_diff)}" if self.env_diff else "")
        )

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


def _score_diff(a: Run, b: Run) -> float | None:
    sa, sb = a.score_array(), b.score_array()
    if sa is None or sb is None or a.images_id != b.images_id:
        return None  # different test images: scores do not line up
    return float(np.max(np.abs(sa - sb), initial=0.0))


def compare_runs(a: Run, b: Run, tolerance: float, store: Store, differs: str) -> Pair:
    """The verdict on two runs of one seed; ``differs`` names a difference beyond tolerance."""
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


def worst(pairs: Sequence[Pair]) -> str:
    return max((p.verdict for p in pairs), key=_SEVERITY.__getitem__, default="untested")


@dataclass
class Determinism:
    pairs: list[Pair]

    @property
    def verdict(self) -> str:
        return worst(self.pairs)

    def summary(self) -> str | None:
        """One line on the pairs that are not bitwise equal, naming the worst; None if there are none."""
        differing = [p for p in self.pairs if p.verdict != "bitwise"]
        if not differing:
            return None
        worst_pair = max(differing, key=lambda p: (_SEVERITY[p.verdict], p.max_metric_diff, p.max_score_diff or 0.0))
        return f"{len(differing)} of {len(self.pairs)} pairs differ; worst: {worst_pair.describe()}"

    def to_json(self) -> dict[str, Any]:
        counts = {v: sum(p.verdict == v for p in self.pairs) for v in VERDICTS}
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
        return worst(self.pairs)

    def deltas(self) -> dict[str, dict[str, float]]:
        out = {}
        for m in QUALITY:
            d = [p.metric_diffs[m] for p in self.pairs if m in p.metric_diffs]
            if d:
                out[m] = {"mean": float(np.mean(d)), "max_abs": float(np.max(np.abs(d)))}
        return out

    def delta_over_seed_std(self) -> float | None:
        abs_deltas = [abs(p.metric_diffs["image_AUROC"]) for p in self.pairs if "image_AUROC" in p.metric_diffs]
        return float(np.mean(abs_deltas)) / self.seed_std if abs_deltas and self.seed_std else None

    def fingerprint_diff(self) -> dict[str, list[Any]]:
        """Every environment field that differs on any seed, with its first seen values."""
        differs: dict[str, list[Any]] = {}
        for p in self.pairs:
            for k, v in p.env_diff.items():
                differs.setdefault(k, v)
        return dict(sorted(differs.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "hardware_a": self.hardware_a,
            "hardware_b": self.hardware_b,
            "seeds": [p.a.seed for p in self.pairs],
            "verdict": self.verdict,
            "deltas": self.deltas(),
            "delta_over_seed_std": self.delta_over_seed_std(),
            "max_score_diff": max((p.max_score_diff for p in self.pairs if p.max_score_diff is not None), default=None),
            "fingerprint_diff": self.fingerprint_diff(),
        }


def determinism(ok: list[Run], store: Store, tolerance: float) -> Determinism:
    """Each seed's repeats on one hardware against its lowest repeat."""
    by_key: dict[tuple[int, str], list[Run]] = defaultdict(list)
    for run in ok:
        by_key[(run.seed, run.hardware_id)].append(run)
    pairs = []
    for _, runs in sorted(by_key.items()):
        first = min(runs, key=lambda r: (r.repeat, r.run_id))
        pairs += [compare_runs(first, r, tolerance, store, "diverged") for r in runs if r is not first]
    return Determinism(pairs)


def cross_hardware(ok: list[Run], seed_std: float | None, store: Store, tolerance: float) -> list[CrossHardware]:
    """Per pair of hardware ids, the seeds both ran (lowest repeat on each side)."""
    first: dict[str, dict[int, Run]] = defaultdict(dict)
    for run in sorted(ok, key=lambda r: (r.repeat, r.run_id), reverse=True):
        first[run.hardware_id][run.seed] = run  # the lowest repeat wins
    out = []
    for ha, hb in combinations(sorted(first), 2):
        shared = sorted(set(first[ha]) & set(first[hb]))
        if shared:
            pairs = [compare_runs(first[ha][s], first[hb][s], tolerance, store, "differs") for s in shared]
            out.append(CrossHardware(ha, hb, pairs, seed_std))
    return out
