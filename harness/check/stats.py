"""The statistics behind every verdict: seed spread with bootstrap intervals, P(A>B).

Every number is itself reproducible: bootstraps draw from a fixed seed, and each row's
resamples depend only on its own sizes, so adding a sweep to the store never changes another
group's interval. The thresholds are defined here once; ``--help``, the report's prose and
the docs take them from here.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP_SEED = 0
N_RESAMPLES = 9999
CONFIDENCE = 0.95
CI = f"{CONFIDENCE:.0%} CI"  # how tables and prose name the interval
MIN_SEEDS_TO_COMPARE = 3  # seeds a side below which a comparison says `too few seeds`
MEANINGFUL = 0.75  # P(A>B) a difference must reach to matter (Bouthillier et al., MLSys 2021)
_ROWS_PER_BOOTSTRAP = 512  # rows resampled at once: bounds memory at rows x resamples x n


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
    by_n: dict[int, list[Stat]] = defaultdict(list)
    for s in stats:
        if s.n < 2:
            continue
        if np.allclose(s.values, s.values[0], rtol=1e-12, atol=0):  # every seed equal (to rounding)
            s.ci_low, s.ci_high = float(s.values.min()), float(s.values.max())
        else:
            by_n[s.n].append(s)
    if not by_n:
        return
    from scipy.stats import bootstrap  # 1 s to import: only when there is an interval to draw

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


def mean_over_categories(stats: Sequence[Stat]) -> Stat | None:
    """Per seed, the mean over categories (the "Avg" of published tables), over shared seeds."""
    if not stats:
        return None
    per_seed = [dict(zip(s.seeds, s.values, strict=True)) for s in stats]
    shared = sorted(set.intersection(*(set(p) for p in per_seed)))
    if not shared:
        return None
    return Stat(np.array([np.mean([p[s] for p in per_seed]) for s in shared]), np.array(shared))


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
