"""Verdicts on pairs of runs that should agree: the same seed repeated in the same execution
environment (determinism), or run in another (cross-environment: other hardware, another ISA,
precision or library build).

A pair is ``bitwise`` (equal score and map hashes), ``within_tolerance`` (hashes differ,
every quality metric within the tolerance) or, beyond that, ``diverged`` (same environment) /
``differs`` (another environment).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.check.load import Run, Store
from harness.check.memo import Memo
from harness.formatting import fmt_small
from harness.record import QUALITY

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_TOLERANCE = 1e-3  # absolute, per quality metric: below the third decimal anyone reports
VERDICTS = ("bitwise", "within_tolerance", "diverged")
_SEVERITY = {"untested": -1, "bitwise": 0, "within_tolerance": 1, "diverged": 2, "differs": 2}


def env_label(run: Run) -> str:
    """How a run's environment is named: the study's name for it and its id, or the id."""
    return f"{run.variant} ({run.environment_id})" if run.variant else run.environment_id


def aligned_scores(a: Run, b: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """Both runs' per-image scores, when they scored the same test images (None otherwise)."""
    sa, sb = a.score_array(), b.score_array()
    if sa is None or sb is None or a.images_id != b.images_id or len(sa) != len(sb):
        return None
    return sa, sb


@dataclass
class ScoreDiff:
    """How far two runs' per-image scores are apart (the same test images, in the same order)."""

    max_abs: float
    max_rel: float  # |b - a| / |a|, largest over images
    ranking_identical: bool  # sorted by a's scores, b's never fall: the images rank the same
    kendall_tau: float  # rank agreement: 1 when the rankings are identical

    @classmethod
    def of(cls, a: Run, b: Run) -> ScoreDiff | None:
        aligned = aligned_scores(a, b)
        if aligned is None:
            return None
        sa, sb = aligned
        if not len(sa):
            return BITWISE_SCORES
        diff = np.abs(sa - sb)
        rel = diff / np.abs(sa).clip(np.finfo(np.float64).tiny)
        in_a_order = sb[sa.argsort(kind="stable")]
        same = bool((in_a_order[1:] >= in_a_order[:-1]).all())  # b's scores never fall in a's order
        if same or len(sa) < 2:
            tau = 1.0
        else:
            from scipy.stats import kendalltau  # 1.3 s to import: only when a ranking differs

            tau = float(kendalltau(sa, sb).statistic)
        return cls(float(diff.max()), float(rel.max()), same, tau)

    @classmethod
    def remembered(cls, a: Run, b: Run, memo: Memo) -> ScoreDiff | None:
        """``of``, computed only for score arrays the memo has no answer for."""
        if aligned_scores(a, b) is None or a.scores is None or b.scores is None:
            return None
        key = memo.key(b"score-diff", a.scores, b.scores)
        hit = memo.get(key)
        if hit is not None:
            return cls(float(hit[0]), float(hit[1]), bool(hit[2]), float(hit[3]))  # type: ignore[arg-type]
        diff = cls.of(a, b)
        assert diff is not None  # aligned
        memo.put(key, [diff.max_abs, diff.max_rel, diff.ranking_identical, diff.kendall_tau])
        return diff

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "ranking_identical": self.ranking_identical,
            "kendall_tau": self.kendall_tau,
        }


BITWISE_SCORES = ScoreDiff(0.0, 0.0, True, 1.0)


@dataclass
class Pair:
    """Two runs that should agree: same seed, in the same environment (determinism) or not."""

    a: Run
    b: Run
    verdict: str
    metric_diffs: dict[str, float]  # b - a, per quality metric both have
    scores: ScoreDiff | None = None  # None: their test images differ
    env_diff: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def max_score_diff(self) -> float | None:
        return self.scores.max_abs if self.scores else None

    @cached_property  # read for every table and count: the pairs never change
    def max_metric_diff(self) -> float:
        return max((abs(v) for v in self.metric_diffs.values()), default=0.0)

    def describe(self) -> str:
        """One line: which runs, the verdict, how far apart, what differs in their environments."""
        return (
            f"seed {self.a.seed} in {env_label(self.a)}, repeat {self.a.repeat} vs {self.b.repeat}: {self.verdict}, "
            f"max metric diff {fmt_small(self.max_metric_diff)}, max score diff {fmt_small(self.max_score_diff)} "
            f"({self.a.run_id} vs {self.b.run_id})"
            + (f"; environment differs in {', '.join(self.env_diff)}" if self.env_diff else "")
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.a.seed,
            "environment_a": self.a.environment_id,
            "environment_b": self.b.environment_id,
            "run_a": self.a.run_id,
            "run_b": self.b.run_id,
            "repeat_a": self.a.repeat,
            "repeat_b": self.b.repeat,
            "verdict": self.verdict,
            "max_score_diff": self.max_score_diff,
            "scores": self.scores.to_json() if self.scores else None,
            "max_metric_diff": self.max_metric_diff,
            "metric_diffs": self.metric_diffs,
            "env_diff": self.env_diff,
        }


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
    scores = BITWISE_SCORES if verdict == "bitwise" else ScoreDiff.remembered(a, b, store.memo)
    return Pair(a, b, verdict, diffs, scores, store.env_diff(a.env_id, b.env_id))


def worst(pairs: Sequence[Pair]) -> str:
    return max((p.verdict for p in pairs), key=_SEVERITY.__getitem__, default="untested")


@dataclass
class Determinism:
    pairs: list[Pair]

    @cached_property  # read for every table and count: the pairs never change
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
class CrossEnvironment:
    """One group's seeds in two execution environments, side by side."""

    pairs: list[Pair]  # one per shared seed: the lowest repeat on each side
    seed_std: float | None  # the group's image AUROC std over seeds, to size the deltas against

    @property
    def a(self) -> Run:
        return self.pairs[0].a

    @property
    def b(self) -> Run:
        return self.pairs[0].b

    @cached_property  # read for every table and count: the pairs never change
    def verdict(self) -> str:
        return worst(self.pairs)

    @property
    def same_machine(self) -> bool | None:
        """Whether both environments are on one machine (None: a record does not say)."""
        if self.a.machine_id is None or self.b.machine_id is None:
            return None
        return self.a.machine_id == self.b.machine_id

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

    def scores(self) -> ScoreDiff | None:
        """The largest score differences and the worst rank agreement over the seeds."""
        diffs = [p.scores for p in self.pairs if p.scores is not None]
        if not diffs:
            return None
        return ScoreDiff(
            max(d.max_abs for d in diffs),
            max(d.max_rel for d in diffs),
            all(d.ranking_identical for d in diffs),
            min(d.kendall_tau for d in diffs),
        )

    def fingerprint_diff(self) -> dict[str, list[Any]]:
        """Every environment field that differs on any seed, with its first seen values."""
        differs: dict[str, list[Any]] = {}
        for p in self.pairs:
            for k, v in p.env_diff.items():
                differs.setdefault(k, v)
        return dict(sorted(differs.items()))

    def to_json(self) -> dict[str, Any]:
        scores = self.scores()
        return {
            "environment_a": self.a.environment_id,
            "environment_b": self.b.environment_id,
            "variant_a": self.a.variant,
            "variant_b": self.b.variant,
            "same_machine": self.same_machine,
            "seeds": [p.a.seed for p in self.pairs],
            "verdict": self.verdict,
            "deltas": self.deltas(),
            "delta_over_seed_std": self.delta_over_seed_std(),
            "max_score_diff": scores.max_abs if scores else None,
            "scores": scores.to_json() if scores else None,
            "fingerprint_diff": self.fingerprint_diff(),
        }


def determinism(ok: list[Run], store: Store, tolerance: float) -> Determinism:
    """Each seed's repeats in one environment against its lowest repeat."""
    by_key: dict[tuple[int, str], list[Run]] = defaultdict(list)
    for run in ok:
        by_key[(run.seed, run.environment_id)].append(run)
    pairs = []
    for _, runs in sorted(by_key.items()):
        first = min(runs, key=lambda r: (r.repeat, r.run_id))
        pairs += [compare_runs(first, r, tolerance, store, "diverged") for r in runs if r is not first]
    return Determinism(pairs)


def environment_order(runs: Sequence[Run]) -> list[str]:
    """Environment ids as the study named them (variant names sorted), unnamed ones after."""
    seen = {r.environment_id: r.variant for r in runs}
    return sorted(seen, key=lambda e: (seen[e] is None, seen[e] or "", e))


def cross_environment(ok: list[Run], seed_std: float | None, store: Store, tolerance: float) -> list[CrossEnvironment]:
    """Per pair of environments, the seeds both ran (lowest repeat on each side)."""
    first: dict[str, dict[int, Run]] = defaultdict(dict)
    for run in sorted(ok, key=lambda r: (r.repeat, r.run_id), reverse=True):
        first[run.environment_id][run.seed] = run  # the lowest repeat wins
    out = []
    for ea, eb in combinations(environment_order(ok), 2):
        shared = sorted(set(first[ea]) & set(first[eb]))
        if shared:
            pairs = [compare_runs(first[ea][s], first[eb][s], tolerance, store, "differs") for s in shared]
            out.append(CrossEnvironment(pairs, seed_std))
    return out
