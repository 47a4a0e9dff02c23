"""Across categories: a model's scores over every category and seed, as rliable summarises them.

Agarwal et al. (NeurIPS 2021, the ``rliable`` library) recommend, for few runs on many tasks:
the mean and the interquartile mean (IQM: the mean of the middle 50% of all task x run
scores, robust to a category that fails or saturates) with stratified bootstrap intervals
(each resample redraws the seeds within every category, so each category keeps its weight),
and the probability of improvement averaged over tasks. These are those, on a model's
per-seed values in each category (``Group.stats``), with rliable's definitions: the mean is the
mean of the category means, the IQM scipy's ``trim_mean(scores, 0.25)`` of the pooled scores,
P(A>B) per category ties half (Mann-Whitney's U over na nb). Intervals are percentile ones,
rliable's default, of N_RESAMPLES resamples seeded by BOOTSTRAP_SEED and the inputs' sizes, so
an answer depends on its inputs alone (and is kept in the memo by them). From ASYMPTOTIC_FROM
seeds a side in every category, P(A>B)'s interval is the asymptotic one of ``stats``, its
moments summed over the independent categories.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from harness.check.stats import (
    ASYMPTOTIC_FROM,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    N_RESAMPLES,
    comparison_verdict,
    cornish_fisher,
    win_moments,
)

IQM_CUT = 0.25  # the share cut from each end of the pooled scores: the interquartile mean
_BLOCK_ELEMENTS = 1 << 16  # resample counts (resamples x values) at once: 512 KiB, reused, not mapped afresh
_ROWS_AT_ONCE = 256  # models whose bootstrap distributions are held at once (40 MiB)
_TAIL = (1 - CONFIDENCE) / 2 * 100

Row = Sequence[np.ndarray]  # one model's values per category, by seed
Estimates = tuple[float, float, float, float, float, float]  # mean, its CI, IQM, its CI


def _estimate(value: float, lo: float, hi: float) -> dict[str, float | None]:
    ok = math.isfinite(lo) and math.isfinite(hi)
    return {"value": value, "ci_low": lo if ok else None, "ci_high": hi if ok else None}


@dataclass
class Aggregate:
    """One model's metric over the categories it ran (sorted) and their seeds."""

    label: str
    metric: str
    categories: list[str]
    values: list[np.ndarray]  # per category, by seed
    estimates: Estimates = (math.nan,) * 6

    def of(self, category: str) -> np.ndarray:
        return self.values[self.categories.index(category)]

    def to_json(self) -> dict[str, Any]:
        mean, mean_lo, mean_hi, iqm, iqm_lo, iqm_hi = self.estimates
        return {
            "label": self.label,
            "metric": self.metric,
            "categories": self.categories,
            "n_categories": len(self.categories),
            "n_seeds": [len(v) for v in self.values],
            "mean": _estimate(mean, mean_lo, mean_hi),
            "iqm": _estimate(iqm, iqm_lo, iqm_hi),
        }


@dataclass
class AcrossComparison:
    """P(A>B) averaged over the categories where two models' runs can be compared."""

    metric: str
    a: Aggregate
    b: Aggregate
    categories: list[str]
    p: float
    ci_low: float
    ci_high: float

    @property
    def n_a(self) -> int:
        """A's fewest seeds in any of the categories (the verdict's seed rule)."""
        return min(len(self.a.of(c)) for c in self.categories)

    @property
    def n_b(self) -> int:
        return min(len(self.b.of(c)) for c in self.categories)

    @property
    def verdict(self) -> str:
        return comparison_verdict(self.p, self.ci_low, self.ci_high, self.n_a, self.n_b)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "a": self.a.label,
            "b": self.b.label,
            "categories": self.categories,
            "n_categories": len(self.categories),
            "n_a": self.n_a,
            "n_b": self.n_b,
            "p_a_better": self.p,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "verdict": self.verdict,
        }


def aggregates(rows: Sequence[Row]) -> list[Estimates]:
    """Per row, the mean and IQM over categories and seeds, each with its stratified bootstrap CI.

    Rows of the same sizes (seeds per category) share their resamples, drawn once for up to
    _ROWS_AT_ONCE of them; each row's answer is still its own, as the draws are seeded by the
    sizes alone.
    """
    out: list[Estimates] = [(0.0,) * 6] * len(rows)
    by_sizes: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_sizes[tuple(len(v) for v in row)].append(i)
    for sizes, same in by_sizes.items():
        for start in range(0, len(same), _ROWS_AT_ONCE):
            members = same[start : start + _ROWS_AT_ONCE]
            pooled = [Pooled.of(rows[i]) for i in members]
            boots = np.empty((len(members), 2, N_RESAMPLES))
            done = 0
            for block in _stratified_indices(sizes):
                counts = resample_counts(block)
                for k, p in enumerate(pooled):
                    boots[k, :, done : done + len(counts)] = p.mean_and_iqm(counts)
                done += len(counts)
            lo, hi = np.percentile(boots, [_TAIL, 100 - _TAIL], axis=-1)
            for k, p in enumerate(pooled):
                mean, iqm = p.mean_and_iqm(np.ones((1, len(p.order))))[:, 0]
                out[members[k]] = tuple(float(x) for x in (mean, lo[k, 0], hi[k, 0], iqm, lo[k, 1], hi[k, 1]))  # type: ignore[assignment]
    return out


def _stratified_indices(sizes: Sequence[int]) -> Iterator[list[np.ndarray]]:
    """N_RESAMPLES stratified resamples in blocks: per category an (r, n) array of its seeds' indices."""
    rng = np.random.default_rng([BOOTSTRAP_SEED, *sizes])
    step = max(1, _BLOCK_ELEMENTS // sum(sizes))
    for start in range(0, N_RESAMPLES, step):
        r = min(step, N_RESAMPLES - start)
        yield [rng.integers(0, n, (r, n)) for n in sizes]


def resample_counts(indices: Sequence[np.ndarray]) -> np.ndarray:
    """(r, N): how often each of a row's N values (categories one after another) is drawn in
    each of r resamples, from each category's (r, n) indices into its own seeds."""
    r, total = len(indices[0]), sum(idx.shape[1] for idx in indices)
    offsets = np.cumsum([0, *(idx.shape[1] for idx in indices[:-1])])
    flat = np.concatenate([idx + off for idx, off in zip(indices, offsets, strict=True)], axis=1)
    flat += total * np.arange(r)[:, None]  # each resample its own N bins
    return np.bincount(flat.ravel(), minlength=r * total).reshape(r, total).astype(np.float64)


class Pooled(NamedTuple):
    """A row's values, arranged once for every resample: a resample is a count per value."""

    order: np.ndarray  # positions of the values (categories one after another), ascending by value
    ranked: np.ndarray  # the values in that order
    in_mean: np.ndarray  # each value over (categories x its category's seeds): its weight in the mean

    @classmethod
    def of(cls, row: Row) -> Pooled:
        values = np.concatenate(row).astype(np.float64)
        order = np.argsort(values, kind="stable")
        sizes = [len(v) for v in row]
        return cls(order, values[order], values / np.repeat([len(row) * n for n in sizes], sizes))

    def mean_and_iqm(self, counts: np.ndarray) -> np.ndarray:
        """(2, r): per resample (a row of counts), the mean of the category means and the IQM
        of all its values, scipy's trim_mean(0.25): the mean of the ranks [cut, N - cut) of
        the N values drawn. Ranks from counts: the values at a sorted position hold the ranks
        from the running count before it to the running count after; each counts in the middle
        for the overlap of that span with [cut, N - cut)."""
        total = len(self.order)
        cut = int(IQM_CUT * total)
        running = np.cumsum(counts[:, self.order], axis=1)
        np.clip(running, cut, total - cut, out=running)
        share = np.diff(running, axis=1, prepend=float(cut))
        return np.stack([counts @ self.in_mean, share @ self.ranked / (total - 2 * cut)])


def mean_and_iqm(row: Row, indices: Sequence[np.ndarray]) -> np.ndarray:
    """(2, r): the mean of category means and the IQM of a row's resamples, each given as one
    (r, n) array of seed indices per category."""
    return Pooled.of(row).mean_and_iqm(resample_counts(indices))


def improvement(pairs: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]]) -> list[tuple[float, float, float]]:
    """Per pair of models (their values in each category both have), the average over categories
    of P(A>B) (ties half) with a stratified bootstrap CI: in each category, A's seeds and B's
    are redrawn independently (rliable's StratifiedIndependentBootstrap).

    Below ASYMPTOTIC_FROM seeds a side anywhere, a seeded percentile bootstrap: a resample's
    P(A>B) in a category is a bilinear form over its win table (``stats._win_bootstrap``), and
    pairs of the same sizes share their draws. From there on, the bootstrap distribution's
    asymptotic quantiles: the categories' resamples are independent, so the mean's variance and
    third cumulant are the categories' summed over M^2 and M^3.
    """
    out: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(pairs)
    by_sizes: dict[tuple[tuple[int, int], ...], list[int]] = defaultdict(list)
    for i, cats in enumerate(pairs):
        values = [v for ab in cats for v in ab]
        if min(map(len, values)) >= ASYMPTOTIC_FROM and not any(np.isnan(v).any() for v in values):
            moments = np.array([win_moments(a, b) for a, b in cats])
            m = len(cats)
            out[i] = cornish_fisher(float(moments[:, 0].mean()), moments[:, 1].sum() / m**2, moments[:, 2].sum() / m**3)
        else:
            by_sizes[tuple((len(a), len(b)) for a, b in cats)].append(i)
    for sizes, members in by_sizes.items():
        rng = np.random.default_rng([BOOTSTRAP_SEED, *(n for ab in sizes for n in ab)])
        weights = [(_counts(rng, na), _counts(rng, nb)) for na, nb in sizes]
        for i in members:
            boot = improvement_resamples(pairs[i], weights)
            lo, hi = np.percentile(boot, [_TAIL, 100 - _TAIL])
            p = float(np.mean([_wins(a, b).mean() for a, b in pairs[i]]))
            out[i] = (p, float(lo), float(hi))
    return out


def _counts(rng: np.random.Generator, n: int) -> np.ndarray:
    """(N_RESAMPLES, n): how often each of n seeds is drawn in each resample (float32: exact)."""
    idx = rng.integers(0, n, (N_RESAMPLES, n))
    idx += n * np.arange(N_RESAMPLES)[:, None]
    return np.bincount(idx.ravel(), minlength=n * N_RESAMPLES).reshape(N_RESAMPLES, n).astype(np.float32)


def _wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[:, None] > b) + 0.5 * (a[:, None] == b)


def improvement_resamples(
    cats: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Each resample's average over categories of P(A>B), from each category's resample counts
    of A's seeds and B's ((r, na) and (r, nb))."""
    total = np.zeros(len(weights[0][0]))
    for (a, b), (wa, wb) in zip(cats, weights, strict=True):
        wins = _wins(a, b).astype(np.float32)
        total += ((wa @ wins) * wb).sum(-1, dtype=np.float64) / (len(a) * len(b))
    return total / len(cats)
