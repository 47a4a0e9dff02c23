"""The statistics behind every verdict: seed spread with bootstrap intervals, P(A>B).

Every number is itself reproducible: bootstraps draw from a fixed seed, and each row's
resamples depend only on its own sizes, so adding a sweep to the store never changes another
group's interval. Large groups take shortcuts that scale to hundreds of seeds: from
``BATCHED_BCA_FROM`` seeds a mean's BCa interval is scipy's, computed from count-weighted matrix
products (equal to scipy's to rounding); from ``ASYMPTOTIC_FROM`` seeds a side P(A>B)'s interval
is asymptotic, each endpoint within 0.01 of the seeded bootstrap's. The thresholds are defined
here once; ``--help``, the report's prose and the docs take them from here.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

BOOTSTRAP_SEED = 0
N_RESAMPLES = 9999
CONFIDENCE = 0.95
CI = f"{CONFIDENCE:.0%} CI"  # how tables and prose name the interval
MIN_SEEDS_TO_COMPARE = 3  # seeds a side below which a comparison says `too few seeds`
MEANINGFUL = 0.75  # P(A>B) a difference must reach to matter (Bouthillier et al., MLSys 2021)
# Seeds from which a mean's BCa interval is computed here, not by scipy: scipy's interval for
# the row alone (to rounding, see `_bca_batched`). From about 8 seeds, scipy's sums over several
# rows at once depend on the other rows; below, its intervals are each row's own and cheap.
BATCHED_BCA_FROM = 8
# Seeds a side from which P(A>B)'s interval is asymptotic: within 0.01 of the bootstrap's from
# here on (tests/test_stats_scaling.py), where the bootstrap costs R x na x nb a pair.
ASYMPTOTIC_FROM = 100
_ROWS_PER_BOOTSTRAP = 512  # rows scipy resamples at once: bounds memory at rows x resamples x n
# Memory of the batched BCa, in arrays of at most 16 MiB (larger ones are mapped afresh on each use):
_BOOTSTRAP_BYTES = 16 << 20  # bootstrap means of a chunk of rows (rows x resamples float64)
_INDEX_ELEMENTS = 1 << 21  # resample indices and counts in one batch (resamples x n)
_KEEP_ELEMENTS = 1 << 23  # resamples kept for all rows of a size (to n = 838: 12 bytes each), else redrawn
_SORT_ROWS = 64  # rows whose bootstrap means are sorted at once
_WIN_TABLE_BYTES = 64 << 20  # exact P(A>B) bootstrap: the pairs x resamples x nb products held at once


@dataclass
class Stat:
    """Seed variance of one metric in one group: one value per seed."""

    values: np.ndarray  # by seed, ascending
    seeds: np.ndarray  # the seed of each value
    ci_low: float | None = None
    ci_high: float | None = None
    mdd: float | None = None  # the smallest difference two such groups could detect (harness.check.power)

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
            "mdd": self.mdd,
        }


def seed_mean(repeats: Sequence[float]) -> float:
    """A seed's value: the mean of its repeats (they test determinism; they are not samples)."""
    return sum(repeats) / len(repeats)


def bootstrap_means(stats: Iterable[Stat]) -> None:
    """Fill each stat's 95% CI of the mean: scipy's BCa bootstrap, seeded, batched by size.

    Every row of one size sees the same resamples (scipy draws one index matrix per call), so a
    row's interval depends only on its own values. From BATCHED_BCA_FROM seeds `_bca_batched`
    gives each row scipy's interval of that row alone, whatever shares the call, without scipy's
    rows x resamples x n gather. Below it scipy runs on chunks of rows as it always has; it sums
    a chunk's resamples in another order than one row's (sequentially, not pairwise), so from 8
    seeds a row's interval there can differ in the last bits between alone and among others,
    and with tied values by a step of their lattice.
    """
    by_n: dict[int, list[Stat]] = defaultdict(list)
    for s in stats:
        if s.n < 2:
            continue
        if np.allclose(s.values, s.values[0], rtol=1e-12, atol=0):  # every seed equal (to rounding)
            s.ci_low, s.ci_high = float(s.values.min()), float(s.values.max())
        elif s.n >= BATCHED_BCA_FROM and not np.isfinite(s.values).all():
            s.ci_low = s.ci_high = None  # scipy's interval is NaN or infinite: undefined
        else:
            by_n[s.n].append(s)
    for n, group in sorted(by_n.items()):
        if n < BATCHED_BCA_FROM:
            _scipy_bca(n, group)
            continue
        resamples = _resamples(n)
        rows = max(1, _BOOTSTRAP_BYTES // (8 * N_RESAMPLES))
        for start in range(0, len(group), rows):
            chunk = group[start : start + rows]
            lo, hi = _bca_batched(np.stack([s.values for s in chunk]).astype(np.float64), resamples)
            _set_intervals(chunk, lo, hi)


def _set_intervals(chunk: Sequence[Stat], lo: np.ndarray, hi: np.ndarray) -> None:
    for s, a, b in zip(chunk, lo, hi, strict=True):
        s.ci_low, s.ci_high = float(a), float(b)
        if not (math.isfinite(s.ci_low) and math.isfinite(s.ci_high)):  # BCa undefined: say so
            s.ci_low = s.ci_high = None


def _scipy_bca(n: int, group: Sequence[Stat]) -> None:
    """scipy.stats.bootstrap itself, for rows of n values (cheap for small n)."""
    from scipy.stats import bootstrap  # 1 s to import: only when there is an interval to draw

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
        _set_intervals(chunk, np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high))


Resamples = Callable[[], Iterable[tuple[int, np.ndarray, np.ndarray]]]


def _resamples(n: int) -> Resamples:
    """scipy's resamples of n values, batch by batch: drawn once and kept if they fit, else drawn on each pass."""
    if n * N_RESAMPLES <= _KEEP_ELEMENTS:
        kept = [(start, idx.astype(np.int32), counts) for start, idx, counts in _draw_resamples(n)]
        return lambda: kept
    return lambda: _draw_resamples(n)


def _draw_resamples(n: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Each batch's first resample, its (resamples, n) indices and counts of each value (float64).

    scipy draws default_rng(BOOTSTRAP_SEED).integers(0, n, (N_RESAMPLES, n)) for every call;
    drawn in batches, the indices are the same.
    """
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    step = max(1, _INDEX_ELEMENTS // n)
    for start in range(0, N_RESAMPLES, step):
        idx = rng.integers(0, n, (min(step, N_RESAMPLES - start), n))
        offsets = n * np.arange(len(idx))[:, None]
        idx += offsets  # each resample its own n bins, in place
        counts = np.bincount(idx.ravel(), minlength=idx.size).reshape(idx.shape).astype(np.float64)
        idx -= offsets
        yield start, idx, counts


def _bca_batched(data: np.ndarray, resamples: Resamples) -> tuple[np.ndarray, np.ndarray]:
    """scipy's BCa interval of each row's mean (float64 rows of n values), as one matrix product.

    A resample's mean is the row dotted with the resample's counts of each value, divided by n,
    so one product gives every row's bootstrap distribution. It sums in another order than
    scipy's mean of the gathered resample, and the two differ by less than `slack`. The interval
    looks at the distribution in two places only: the share below the estimate (bias) and four
    order statistics (quantiles). Every mean within slack of those is recomputed as scipy computes
    it, so both are scipy's bitwise and depend on no other row. The acceleration is the closed-form
    jackknife of the mean, and the normal quantiles are the standard library's; these differ from
    scipy's by rounding, so an endpoint differs from scipy's by about 1e-16 of the values.
    """
    rows, n = data.shape
    theta = np.mean(data, axis=-1)  # scipy's estimate, summed as scipy sums it
    big = np.abs(data).max(axis=-1)
    # Each mean's rounding error is at most (n + 2) eps/2 max|x| (n products, n - 1 sums, a
    # division), in any order; slack is four times the two errors together. Integer values with
    # exact sums need none: every order gives the same mean.
    exact = (data == np.round(data)).all(axis=-1) & (big * n < 2.0**53)
    slack = np.where(exact, 0.0, 4 * (n + 2) * np.finfo(np.float64).eps * big)
    lo_band, hi_band = (theta - slack)[:, None], (theta + slack)[:, None]

    boot = np.empty((rows, N_RESAMPLES))
    below = np.zeros(rows, dtype=np.int64)  # resamples whose mean is below theta (scipy's, bitwise)
    at = np.zeros(rows, dtype=np.int64)  # ... and equal to it
    for start, idx, counts in resamples():
        block = boot[:, start : start + len(idx)]
        np.matmul(data, counts.T, out=block)
        block /= n
        below += np.count_nonzero(block < lo_band, axis=-1)
        r, c = np.nonzero((block >= lo_band) & (block <= hi_band))
        means = _scipy_means(data, r, c, idx, block[r, c], slack)
        np.add.at(below, r[means < theta[r]], 1)
        np.add.at(at, r[means == theta[r]], 1)
    z0 = np.array([_ndtri(q) for q in (2 * below + at) / (2 * N_RESAMPLES)])

    # scipy's acceleration, with the jackknife means in closed form
    jack = (data.sum(axis=-1, keepdims=True) - data) / (n - 1)
    u = (n - 1) * (jack.mean(axis=-1, keepdims=True) - jack)
    a_hat = 1 / 6 * ((u**3).sum(axis=-1) / n**3) / ((u**2).sum(axis=-1) / n**2) ** (3 / 2)
    z_alpha = _ndtri((1 - CONFIDENCE) / 2)
    with np.errstate(all="ignore"):  # a degenerate row (z0 infinite) gets NaN: no interval
        alphas = []
        for z in (z_alpha, -z_alpha):
            num = z0 + z
            alphas.append(np.array([_ndtr(v) for v in z0 + num / (1 - a_hat * num)]))

    # scipy.stats.quantile's default ('linear') at each row's two levels: order statistics j, j + 1
    levels = []
    for alpha in alphas:
        bad = ~((alpha >= 0) & (alpha <= 1))  # NaN too
        p = np.where(bad, 0.5, alpha)
        jg = p * float(N_RESAMPLES) + (1 - p)
        jp1 = jg // 1
        j = jp1 - 1
        g = np.where(j < 0, 0.0, jg % 1)
        j = np.clip(j, 0, N_RESAMPLES - 1).astype(np.int64)
        jp1 = np.clip(jp1, 0, N_RESAMPLES - 1).astype(np.int64)
        levels.append((bad, g, j, jp1))
    windows = _order_statistic_windows(boot, [(j, jp1) for _, _, j, jp1 in levels], slack)
    # the windows' means as scipy computes them: a second pass over the same resamples
    r = np.concatenate([w[1] for w in windows])
    c = np.concatenate([w[2] for w in windows])
    means = np.empty(len(r))
    for start, idx, _ in resamples():
        mine = (c >= start) & (c < start + len(idx))
        means[mine] = _scipy_means(data, r[mine], c[mine] - start, idx, boot[r[mine], c[mine]], slack)
    ends = []
    offset = 0
    for (bad, g, j, jp1), (below, wr, _) in zip(levels, windows, strict=True):
        wm = means[offset : offset + len(wr)]
        offset += len(wr)
        order = np.lexsort((wm, wr))  # by row, then by scipy's mean
        first = np.searchsorted(wr[order], np.arange(rows))
        ordered = wm[order]
        ends.append(np.where(bad, np.nan, (1 - g) * ordered[first + j - below] + g * ordered[first + jp1 - below]))
    return ends[0], ends[1]


def _order_statistic_windows(
    boot: np.ndarray, positions: Sequence[tuple[np.ndarray, np.ndarray]], slack: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per row and pair of order statistics (j, jp1), the resamples that may be scipy's, and how many lie below.

    The approximate j-th mean is within slack/4 of scipy's, so scipy's j-th and jp1-th means are
    among the resamples within a slack of the approximate ones, and every resample outside this
    window lies on the same side of both in either arithmetic. Returns (below, rows, resamples)
    for each pair. Selection, not sorting: a partition at the extreme positions of 64 rows, then
    a sort of the slice between them.
    """
    found: list[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]] = [([], [], []) for _ in positions]
    for start in range(0, len(boot), _SORT_ROWS):
        part = slice(start, start + _SORT_ROWS)
        block = boot[part]
        spans = [(int(j[part].min()), int(jp1[part].max())) for j, jp1 in positions]
        kth = sorted({k for span in spans for k in span})
        parted = np.partition(block, kth, axis=-1)
        pick = np.arange(len(block))
        for (j, jp1), (first, last), (below, rs, cs) in zip(positions, spans, found, strict=True):
            between = np.sort(parted[:, first : last + 1], axis=-1)  # order statistics first..last
            lo = (between[pick, j[part] - first] - slack[part])[:, None]
            hi = (between[pick, jp1[part] - first] + slack[part])[:, None]
            below.append(np.count_nonzero(block < lo, axis=-1))
            r, c = np.nonzero((block >= lo) & (block <= hi))
            rs.append(r + start)
            cs.append(c)
    return [(np.concatenate(b), np.concatenate(r), np.concatenate(c)) for b, r, c in found]


def _scipy_means(
    data: np.ndarray, r: np.ndarray, c: np.ndarray, idx: np.ndarray, approx: np.ndarray, slack: np.ndarray
) -> np.ndarray:
    """Means of resamples c (rows of idx) of rows r, summed as scipy sums one sample's resamples.

    np.mean over a contiguous last axis: numpy's pairwise summation, as in scipy's (resamples, n) gather.
    """
    means = approx.copy()
    redo = slack[r] > 0  # exact sums are the same in any order
    if redo.any():
        means[redo] = np.mean(data[r[redo, None], idx[c[redo]]], axis=-1)
    return means


def _ndtri(p: float) -> float:
    """scipy.special.ndtri (to rounding) without importing scipy."""
    if 0 < p < 1:
        return NormalDist().inv_cdf(p)
    return -math.inf if p == 0 else math.inf if p == 1 else math.nan


def _ndtr(x: float) -> float:
    """scipy.special.ndtr (to rounding), accurate in both tails."""
    return 0.5 * math.erfc(-x / math.sqrt(2))


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
    """P(a seed of A scores above a seed of B), ties half, with a 95% CI.

    Under ASYMPTOTIC_FROM seeds a side the CI is a seeded percentile bootstrap (`_win_bootstrap`),
    which costs resamples x na x nb a pair. From there on it is the bootstrap distribution's
    asymptotic one (`_win_asymptotic`, O((na + nb) log(na + nb))): each endpoint within 0.01 of
    the bootstrap's, checked over sizes, effects up to complete separation, and tied values.
    P itself is exact either way.
    """
    out: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(pairs)
    small = [  # NaN wins nothing in the win table, but sorts last: the bootstrap keeps that rule
        i
        for i, (a, b) in enumerate(pairs)
        if min(len(a), len(b)) < ASYMPTOTIC_FROM or np.isnan(a).any() or np.isnan(b).any()
    ]
    for i, result in zip(small, _win_bootstrap([pairs[i] for i in small]), strict=True):
        out[i] = result
    done = set(small)
    for i, (a, b) in enumerate(pairs):
        if i not in done:
            out[i] = _win_asymptotic(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return out


def _win_bootstrap(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, float, float]]:
    """P(A>B) with a seeded percentile bootstrap CI: each resample redraws the seeds of A and of B.

    With multinomial weights, every resample's statistic is a bilinear form over the pairwise win
    table, so pairs of equal sizes share their weights (seeded by the sizes: a pair's interval
    never depends on the others) and go through one batched matrix product, as many pairs and
    resamples at once as _WIN_TABLE_BYTES holds. Weights and wins are small integers and halves,
    exact in float32 and their sums exact in float64, so the grouping changes no bit.
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
        per_row = 2 * 4 * max(nb, 1)  # a resample's wa @ wins and its product with wb, float32
        step = max(1, _WIN_TABLE_BYTES // (per_row * N_RESAMPLES))  # pairs at once
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            wins = np.stack(
                [(pairs[i][0][:, None] > pairs[i][1]) + 0.5 * (pairs[i][0][:, None] == pairs[i][1]) for i in chunk]
            )
            wins32 = wins.astype(np.float32)
            boot = np.empty((len(chunk), N_RESAMPLES))  # pairs x resamples
            rstep = max(1, _WIN_TABLE_BYTES // (per_row * len(chunk)))  # all, unless one pair is too large
            for r in range(0, N_RESAMPLES, rstep):
                boot[:, r : r + rstep] = ((wa[r : r + rstep] @ wins32) * wb[r : r + rstep]).sum(-1, dtype=np.float64)
            boot /= na * nb
            lo, hi = np.percentile(boot, [tail, 100 - tail], axis=-1)
            for k, i in enumerate(chunk):
                out[i] = (float(wins[k].mean()), float(lo[k]), float(hi[k]))
    return out


def _win_asymptotic(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """P(A>B) (ties half) with the asymptotic quantiles of its bootstrap distribution, from sorting."""
    return cornish_fisher(*win_moments(a, b))


def win_moments(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """P(A>B) (ties half), and the variance and third cumulant of its bootstrap distribution.

    P is a two-sample U-statistic with kernel psi(x, y) = 1, 1/2, 0 for x >, =, < y. Resampling
    A and B independently, its bootstrap distribution has mean P and, exactly,

        var = ((nb - 1) z10 + (na - 1) z01 + z11) / (na nb),

    z10 the variance over A of a seed's win rate against B (its placement), z01 the same for B,
    z11 the variance of psi over all pairs (the plug-in, i.e. bootstrap, form of DeLong's
    variance). The distribution is skewed near 0 and 1, so its quantiles are Cornish-Fisher's
    (``cornish_fisher``), with the leading third cumulant of the U-statistic. Checked against the
    bootstrap (tests/test_stats_scaling.py): each endpoint within 0.01 from 100 seeds a side; the
    normal interval alone is off by up to 0.009, the logit one by 0.04.
    """
    na, nb = len(a), len(b)
    sa, sb = np.sort(a), np.sort(b)
    below_a = np.searchsorted(sb, a, "left")  # seeds of B below each seed of A
    upto_a = np.searchsorted(sb, a, "right")
    wins, ties = int(below_a.sum()), int((upto_a - below_a).sum())
    p = (wins + 0.5 * ties) / (na * nb)  # the win table's mean, bitwise: its sum is exact
    h10 = (below_a + upto_a) / (2 * nb) - p  # each seed of A: its win rate against B, less P
    # each seed of B: the win rate of A against it, less P
    h01 = (2 * na - np.searchsorted(sa, b, "left") - np.searchsorted(sa, b, "right")) / (2 * na) - p
    z10, z01 = float(np.mean(h10**2)), float(np.mean(h01**2))
    z11 = (wins + 0.25 * ties) / (na * nb) - p * p
    var = ((nb - 1) * z10 + (na - 1) * z01 + z11) / (na * nb)
    # third cumulant: both linear terms, and 6 E[h10(A) h01(B) psi(A, B)] / (na nb) from the
    # interaction (the sum over B below each seed of A, from cumulative sums in B's order)
    cum = np.concatenate([[0.0], np.cumsum(h01[np.argsort(b, kind="stable")])])
    mixed = float(np.dot(h10, cum[below_a] + cum[upto_a])) / 2 / (na * nb)
    k3 = float(np.mean(h10**3)) / na**2 + float(np.mean(h01**3)) / nb**2 + 6 * mixed / (na * nb)
    return p, var, k3


def cornish_fisher(p: float, var: float, k3: float) -> tuple[float, float, float]:
    """A probability's CI from its bootstrap distribution's variance and third cumulant:
    P + se (z + skew (z^2 - 1) / 6) at both ends, clipped to [0, 1]."""
    if not var > 0:  # every pair the same outcome: every resample gives P
        return p, p, p
    se = math.sqrt(var)
    skew = k3 / se**3
    z = NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2)
    lo, hi = (p + se * (q + skew * (q * q - 1) / 6) for q in (-z, z))
    return p, min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)


def comparison_verdict(p: float, lo: float, hi: float, n_a: int, n_b: int) -> str:
    if min(n_a, n_b) < MIN_SEEDS_TO_COMPARE:
        return "too few seeds"
    if lo > 0.5 and p >= MEANINGFUL:
        return "A better"
    if hi < 0.5 and p <= 1 - MEANINGFUL:
        return "B better"
    return "within noise"
