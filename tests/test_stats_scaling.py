"""The checker's statistics at hundreds of seeds: the same numbers as the slow way, in bounded memory.

- BCa intervals from ``BATCHED_BCA_FROM`` seeds: scipy's own interval of each row, to 1e-12;
- P(A>B) from ``ASYMPTOTIC_FROM`` seeds a side: each endpoint within 0.01 of the seeded
  bootstrap's, the estimate bitwise; under it, the bootstrap itself, bitwise.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import bootstrap

import harness.check.stats as st
from harness.check.stats import (
    ASYMPTOTIC_FROM,
    BATCHED_BCA_FROM,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    N_RESAMPLES,
    Stat,
    bootstrap_means,
    probability_of_improvement,
)

Draw = Callable[[np.random.Generator, int], np.ndarray]
DISTRIBUTIONS: dict[str, Draw] = {
    "normal": lambda rng, n: rng.normal(0.9, 0.02, n),
    "exponential": lambda rng, n: rng.exponential(1.0, n),
    "lognormal": lambda rng, n: rng.lognormal(0.0, 1.5, n),
    # ties: resample means tie the estimate and each other, in rounding that depends on the order
    "two decimals": lambda rng, n: np.round(rng.normal(0.9, 0.02, n), 2),
    "two values": lambda rng, n: rng.choice([0.7, 0.8], n, p=[0.2, 0.8]),
    "small integers": lambda rng, n: rng.integers(0, 4, n).astype(np.float64),
    "one outlier": lambda rng, n: np.r_[rng.normal(0.9, 0.01, n - 1), 0.2],
}
SIZES = [BATCHED_BCA_FROM, 31, 64, 150, 412]


def scipy_interval(values: np.ndarray) -> tuple[float, float]:
    """scipy's BCa interval of these values alone: the interval the checker promises each row.

    Alone, a 1-D sample: scipy sums each resample pairwise. Given a 2-D batch of rows it sums them
    sequentially, so its interval of a row with tied values can move by a step of their lattice
    with the company the row keeps.
    """
    ci = bootstrap(
        (values,),
        np.mean,
        method="BCa",
        n_resamples=N_RESAMPLES,
        confidence_level=CONFIDENCE,
        rng=np.random.default_rng(BOOTSTRAP_SEED),
        vectorized=True,
        axis=-1,
    ).confidence_interval
    return float(ci.low), float(ci.high)


@pytest.fixture(scope="module")
def rows() -> list[np.ndarray]:
    rng = np.random.default_rng(2024)
    return [draw(rng, n) for n in SIZES for draw in DISTRIBUTIONS.values()]


def test_batched_bca_is_scipys_interval_of_each_row(rows: list[np.ndarray]) -> None:
    stats = [Stat(v, np.arange(len(v))) for v in rows]
    bootstrap_means(stats)
    for s in stats:
        low, high = scipy_interval(s.values)
        assert s.ci_low is not None
        assert s.ci_high is not None
        assert abs(s.ci_low - low) <= 1e-12, (s.n, s.values[:4])
        assert abs(s.ci_high - high) <= 1e-12, (s.n, s.values[:4])


def test_a_row_is_bitwise_the_same_alone_among_others_and_however_batched(
    rows: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows share the resamples and one matrix product, but none changes another's interval."""
    ties = [v for v in rows if len(v) == 64]  # every distribution, one size
    alone = [Stat(v, np.arange(64)) for v in ties]
    for s in alone:
        bootstrap_means([s])
    rng = np.random.default_rng(1)
    crowd = [Stat(rng.normal(0.5, 0.1, 64), np.arange(64)) for _ in range(150)]
    twins = [Stat(v, np.arange(64)) for v in ties]
    # in small pieces: rows in several chunks, resamples drawn in several batches, sorted 5 rows at a time
    monkeypatch.setattr(st, "_BOOTSTRAP_BYTES", 40 * 8 * N_RESAMPLES)
    monkeypatch.setattr(st, "_INDEX_ELEMENTS", 64 * 1000)
    monkeypatch.setattr(st, "_SORT_ROWS", 5)
    bootstrap_means([*crowd[:33], *twins, *crowd[33:]])
    assert [(s.ci_low, s.ci_high) for s in twins] == [(s.ci_low, s.ci_high) for s in alone]


def test_batched_bca_keeps_the_edge_cases() -> None:
    n = BATCHED_BCA_FROM + 5
    equal = Stat(np.full(n, 0.93), np.arange(n))
    broken = Stat(np.r_[np.full(n - 1, 0.9), np.nan], np.arange(n))
    infinite = Stat(np.r_[np.linspace(0.8, 0.9, n - 1), np.inf], np.arange(n))
    bootstrap_means([equal, broken, infinite])
    assert (equal.ci_low, equal.ci_high) == (0.93, 0.93)
    assert (broken.ci_low, broken.ci_high, infinite.ci_low, infinite.ci_high) == (None, None, None, None)


def test_large_groups_do_not_import_scipy() -> None:
    """Importing scipy.stats costs a second: large groups need neither it nor scipy.special."""
    code = (
        "import sys, numpy as np\n"
        "from harness.check.stats import Stat, bootstrap_means, probability_of_improvement\n"
        "before = set(sys.modules)\n"
        "rng = np.random.default_rng(0)\n"
        "s = Stat(rng.normal(size=200), np.arange(200))\n"
        "bootstrap_means([s])\n"
        "probability_of_improvement([(rng.normal(size=200), rng.normal(size=150))])\n"
        "assert s.ci_low is not None\n"
        "new = sorted(m for m in set(sys.modules) - before if m.startswith('scipy'))\n"
        "assert not new, new\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_target_shape_fits_in_bounded_memory() -> None:
    """840 groups of 412 seeds, 840 comparisons of 412 a side: once 2.7 GiB, now a few tens of MiB."""
    rng = np.random.default_rng(3)
    stats = [Stat(rng.normal(0.9, 0.02, 412), np.arange(412)) for _ in range(840)]
    pairs = [(rng.normal(0.1, 1, 412), rng.normal(0, 1, 412)) for _ in range(840)]
    tracemalloc.start()
    try:
        bootstrap_means(stats)
        probability_of_improvement(pairs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**20
    assert all(s.ci_low is not None and s.ci_low < s.mean < s.ci_high for s in stats)


# -- P(A>B) ---------------------------------------------------------------------------------

TOLERANCE = 0.01  # each endpoint, against the bootstrap, from ASYMPTOTIC_FROM seeds a side
PAIR_SIZES = [(100, 100), (200, 200), (412, 412), (100, 412), (412, 100), (150, 120)]
EFFECTS = [-6.0, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0]  # none to complete separation (both ways), in sds


def pair_grid() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(11)
    pairs = []
    for na, nb in PAIR_SIZES:
        for d in EFFECTS:
            pairs.append((rng.normal(d, 1, na), rng.normal(0, 1, nb)))
            pairs.append((np.round(rng.normal(d, 1, na)), np.round(rng.normal(0, 1, nb))))  # many ties
    return pairs


@pytest.fixture(scope="module")
def grid() -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[float, float, float]]]:
    pairs = pair_grid()
    return pairs, st._win_bootstrap(pairs)


def test_asymptotic_p_is_the_bootstraps_estimate_bitwise_and_its_interval_within_tolerance(
    grid: tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[float, float, float]]],
) -> None:
    pairs, exact = grid
    assert min(min(len(a), len(b)) for a, b in pairs) >= ASYMPTOTIC_FROM
    fast = probability_of_improvement(pairs)
    assert [p for p, _, _ in fast] == [p for p, _, _ in exact]
    worst = max(max(abs(lo - elo), abs(hi - ehi)) for (_, lo, hi), (_, elo, ehi) in zip(fast, exact, strict=True))
    assert worst <= TOLERANCE
    assert all(0 <= lo <= p <= hi <= 1 for p, lo, hi in fast)
    assert {p for p, _, _ in fast} >= {0.0, 1.0}  # complete separation both ways: [p, p]
    assert all(lo == hi == p for p, lo, hi in fast if p in (0.0, 1.0))


def test_asymptotic_verdicts_agree_with_the_bootstrap(
    grid: tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[float, float, float]]],
) -> None:
    pairs, exact = grid
    fast = probability_of_improvement(pairs)
    for (a, b), f, e in zip(pairs, fast, exact, strict=True):
        if min(abs(e[1] - 0.5), abs(e[2] - 0.5)) > TOLERANCE:  # an endpoint near 0.5 may fall either side
            assert st.comparison_verdict(*f, len(a), len(b)) == st.comparison_verdict(*e, len(a), len(b))


def test_small_pairs_keep_the_bootstrap_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    pairs = [
        (rng.normal(d, 1, na), rng.normal(0, 1, nb))
        for na, nb in [(5, 5), (3, 7), (30, 30), (ASYMPTOTIC_FROM - 1, 130), (130, ASYMPTOTIC_FROM - 1)]
        for d in (0.0, 1.0, 5.0)
    ]
    pairs.append((np.round(rng.normal(0, 1, 40)), np.round(rng.normal(0, 1, 60))))
    pairs.append((np.r_[rng.normal(size=200), np.nan], rng.normal(size=200)))  # NaN: the bootstrap's rule
    expected = st._win_bootstrap(pairs)
    assert probability_of_improvement(pairs) == expected
    monkeypatch.setattr(st, "_WIN_TABLE_BYTES", 4 << 20)  # a pair at a time, in slices of resamples: the same bits
    assert st._win_bootstrap(pairs) == expected


def test_asymptotic_interval_covers_the_true_probability() -> None:
    """Normal shifts of d: P(A>B) = Phi(d / sqrt 2). The 95% interval covers it about 95% of the time."""
    from scipy.stats import norm

    rng = np.random.default_rng(8)
    for d in (0.0, 0.5, 1.5):
        truth = norm.cdf(d / np.sqrt(2))
        hits = [
            lo <= truth <= hi
            for _, lo, hi in probability_of_improvement(
                [(rng.normal(d, 1, ASYMPTOTIC_FROM), rng.normal(0, 1, ASYMPTOTIC_FROM)) for _ in range(400)]
            )
        ]
        assert 0.91 <= np.mean(hits) <= 0.98, (d, np.mean(hits))


@pytest.mark.slow
def test_asymptotic_interval_within_tolerance_on_awkward_distributions() -> None:
    """Skewed, heavy-tailed, lattice, outlier and two-point samples, sizes to 1000: still within 0.01."""
    rng = np.random.default_rng(12)
    pairs = []
    for na, nb in [(100, 100), (100, 1000), (1000, 100), (300, 250)]:
        for d in (0.0, 0.5, 1.5, 3.0, 5.0):
            pairs += [
                (rng.exponential(1, na) + 0.7 * d, rng.exponential(1, nb)),
                (rng.standard_t(2, na) + d, rng.standard_t(2, nb)),
                (
                    np.round(np.clip(rng.normal(0.9 + 0.01 * d, 0.01, na), 0, 1), 2),
                    np.round(rng.normal(0.9, 0.01, nb), 2),
                ),
                (np.where(rng.random(na) < 0.97, rng.normal(d + 2, 0.1, na), 0.0), rng.normal(0.3 * d, 0.1, nb)),
                (np.where(rng.random(na) < 1 - d / 40, 1.0, 0.0), np.where(rng.random(nb) < 0.1, 1.0, 0.5)),
            ]
    pairs += [(b, a) for a, b in pairs]
    fast, exact = probability_of_improvement(pairs), st._win_bootstrap(pairs)
    assert [p for p, _, _ in fast] == [p for p, _, _ in exact]
    worst = max(max(abs(lo - elo), abs(hi - ehi)) for (_, lo, hi), (_, elo, ehi) in zip(fast, exact, strict=True))
    assert worst <= TOLERANCE
