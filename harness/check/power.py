"""Power: what difference a study's seeds could detect, and how many seeds a difference needs.

Both answers come from one test: the two-sided two-sample t-test at level ``ALPHA`` with equal
seeds a side (df = 2(n - 1)), whose power at a true difference delta is the noncentral t's
mass beyond the critical values, with noncentrality delta / (std sqrt(2 / n)). Solved exactly
(scipy.stats.nct), not by the normal approximation, which undercounts small seed counts most:
at 3 seeds a side it puts the detectable difference at 2.3 std where the t-test needs 3.1.

- ``mdd`` of a group: the smallest difference a comparison of two groups like it (its seed
  std, its seed count on each side) detects with probability ``POWER``;
- ``seeds needed`` by a comparison: the fewest seeds a side that detect a difference the user
  names (``--detect``) with probability ``POWER``, from the two sides' pooled std; past
  ``SEEDS_NEEDED_CAP`` it says so instead of a number.

Both depend on the inputs through one number (the seed count, or the difference over the std),
and are kept in the memo by it: a check that recomputes nothing never imports scipy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from harness.check.memo import Memo
from harness.check.stats import CONFIDENCE, Stat

ALPHA = 1 - CONFIDENCE  # the test's level, two-sided: the same 5% as the intervals'
POWER = 0.8  # the chance of detecting the difference (Cohen's convention; Colas et al. 2018)
SEEDS_NEEDED_CAP = 10_000  # seeds a side beyond which `seeds needed` says "more than"
DEFAULT_DETECT = 0.01  # `--detect`: one point of AUROC (docs/cli.md says why)


def power(n: np.ndarray, effect: np.ndarray) -> np.ndarray:
    """The t-test's power with n seeds a side at a true difference of ``effect`` stds (arrays, broadcast)."""
    from scipy.stats import nct, t

    n = np.asarray(n, dtype=np.float64)
    df = 2 * (n - 1)
    crit = t.isf(ALPHA / 2, df)
    nc = np.asarray(effect, dtype=np.float64) * np.sqrt(n / 2)
    # The far tail as the upper tail at -nc: the same number, where nct.cdf(-crit) gives NaN
    # once it underflows (scipy 1.17, e.g. 412 seeds at one std).
    return np.asarray(nct.sf(crit, df, nc) + nct.sf(crit, df, -nc))


def mdd_factor(n: int) -> float:
    """The detectable difference in stds with n seeds a side (n >= 2): where the power is POWER."""
    from scipy.optimize import brentq

    hi = 1.0
    while power(np.array(n), np.array(hi)) < POWER:  # power grows with the effect: bracket, then solve
        hi *= 2
    return float(brentq(lambda d: float(power(np.array(n), np.array(d))) - POWER, 0.0, hi, xtol=1e-12, rtol=1e-12))


def seeds_needed(effects: Sequence[float]) -> list[int | None]:
    """Per effect (a difference in stds, > 0): the fewest seeds a side with power >= POWER,
    None past SEEDS_NEEDED_CAP. One bisection over the integers for all effects at once."""
    d = np.asarray(effects, dtype=np.float64)
    lo = np.ones(len(d), dtype=np.int64)  # fails (no test with one seed a side)
    hi = np.full(len(d), SEEDS_NEEDED_CAP, dtype=np.int64)  # passes, where anything does
    reachable = power(hi, d) >= POWER if len(d) else np.zeros(0, dtype=bool)
    while np.any(hi[reachable] - lo[reachable] > 1):
        mid = (lo + hi) // 2
        ok = power(mid, d) >= POWER
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return [int(h) if r else None for h, r in zip(hi, reachable, strict=True)]


def pooled_std(a: np.ndarray, b: np.ndarray) -> float | None:
    """The two sides' pooled seed std (each side's squares about its own mean); None without
    a degree of freedom (one seed in all)."""
    df = len(a) + len(b) - 2
    if df < 1:
        return None
    squares = float(((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum())
    return math.sqrt(squares / df)


def remembered_mdd(memo: Memo, stats: Iterable[Stat]) -> None:
    """Set each stat's ``mdd`` (seed std times ``mdd_factor`` of its seed count): None under
    two seeds, or with no spread (a zero std detects anything, a t-test nothing)."""
    todo = [(s, std) for s in stats if s.n >= 2 and (std := s.std) is not None and math.isfinite(std) and std > 0]
    ns = sorted({s.n for s, _ in todo})
    keys = [memo.key(b"mdd-factor", n.to_bytes(8, "little")) for n in ns]
    found = memo.each(keys, lambda missing: [[mdd_factor(ns[i])] for i in missing])
    factors = {n: float(hit[0]) for n, hit in zip(ns, found, strict=True)}  # type: ignore[arg-type]
    for s, std in todo:
        s.mdd = factors[s.n] * std


def remembered_seeds_needed(memo: Memo, effects: Sequence[float]) -> list[int | None]:
    """``seeds_needed``, computed only for effects the memo has no answer for."""
    keys = [memo.key(b"seeds-needed", np.float64(e).tobytes()) for e in effects]
    found = memo.each(keys, lambda missing: [[n] for n in seeds_needed([effects[i] for i in missing])])
    return [None if hit[0] is None else int(hit[0]) for hit in found]
