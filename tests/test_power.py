"""Power: the detectable difference of a group and the seeds a comparison needs, against
statsmodels' own power solver on fixed inputs and against a simulation of the t-test itself."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.check.power import (
    ALPHA,
    POWER,
    SEEDS_NEEDED_CAP,
    mdd_factor,
    pooled_std,
    seeds_needed,
)
from harness.cli import main
from tests.recordkit import make_record, write_records

TTestIndPower = pytest.importorskip("statsmodels.stats.power").TTestIndPower

AUROCS = [0.80, 0.82, 0.84, 0.86, 0.88]


def solve(**kw: Any) -> float:
    """statsmodels' answer for the same test: two-sided, equal seeds a side, the same level and power."""
    return float(TTestIndPower().solve_power(alpha=ALPHA, power=POWER, ratio=1.0, alternative="two-sided", **kw))


def their_power(n: int, effect: float) -> float:
    return float(TTestIndPower().power(effect, n, ALPHA, ratio=1.0, alternative="two-sided"))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 10, 30, 100, 412, 5000])
def test_the_detectable_difference_is_statsmodels(n: int) -> None:
    """statsmodels' power function gives 80% at our MDD to 1e-9; its own solver (tolerance
    about 1e-6 in power) lands within 1e-4 of it (3e-5 at 5000 seeds)."""
    assert their_power(n, mdd_factor(n)) == pytest.approx(POWER, abs=1e-9)
    assert mdd_factor(n) == pytest.approx(solve(nobs1=n, effect_size=None), rel=1e-4)


@pytest.mark.parametrize("effect", [0.1, 0.25, 0.5, 0.8, 1.0, 1.7, 2.5, 4.0])
def test_the_seeds_needed_are_statsmodels_rounded_up(effect: float) -> None:
    exact = solve(nobs1=None, effect_size=effect)  # fractional seeds a side
    (needed,) = seeds_needed([effect])
    assert needed == max(2, math.ceil(exact))
    assert their_power(needed, effect) >= POWER
    if needed > 2:
        assert their_power(needed - 1, effect) < POWER


def test_a_large_effect_needs_the_fewest_seeds_a_t_test_takes() -> None:
    assert seeds_needed([9.0]) == [2]  # statsmodels' solver finds no root under 2 seeds
    assert their_power(2, 9.0) >= POWER


def test_past_the_cap_the_seeds_needed_say_so() -> None:
    tiny = 0.02  # about 39,000 seeds a side
    assert solve(nobs1=None, effect_size=tiny) > SEEDS_NEEDED_CAP
    assert seeds_needed([tiny, 0.5]) == [None, math.ceil(solve(nobs1=None, effect_size=0.5))]


def test_the_pooled_std_is_the_textbook_one() -> None:
    a, b = np.array([0.8, 0.82, 0.9]), np.array([0.7, 0.75])
    expected = math.sqrt((2 * statistics.variance(a) + 1 * statistics.variance(b)) / 3)
    assert pooled_std(a, b) == pytest.approx(expected)
    assert pooled_std(np.array([0.5]), np.array([0.6])) is None


@pytest.mark.parametrize("n", [3, 5, 12])
def test_a_simulated_t_test_detects_the_mdd_eight_times_in_ten(n: int) -> None:
    """The power at the MDD by simulation: 40,000 studies of n seeds a side, normal seeds, the
    textbook t-test (scipy's). Within 0.012 of 80% (3 standard errors of the simulation)."""
    from scipy.stats import ttest_ind

    rng = np.random.default_rng(n)
    sims = 40_000
    a = rng.normal(0.0, 1.0, (sims, n))
    b = rng.normal(mdd_factor(n), 1.0, (sims, n))
    detected = float(np.mean(ttest_ind(a, b, axis=-1).pvalue < ALPHA))
    assert detected == pytest.approx(POWER, abs=0.012)


def test_check_gives_each_metric_its_mdd_and_each_comparison_its_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b_values = [0.81, 0.83, 0.85, 0.87, 0.79]
    records = [make_record(sweep="a", seed=i, metrics={"image_AUROC": v}) for i, v in enumerate(AUROCS)]
    records += [make_record(sweep="b", seed=i, metrics={"image_AUROC": v}) for i, v in enumerate(b_values)]
    write_records(tmp_path, records)
    assert main(["check", str(tmp_path), "--json", "--detect", "0.05"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["detect"] == 0.05
    image = doc["groups"][0]["metrics"]["image_AUROC"]
    assert image["mdd"] == pytest.approx(statistics.stdev(AUROCS) * solve(nobs1=5, effect_size=None), rel=1e-6)
    assert doc["groups"][0]["metrics"]["pixel_AUROC"]["mdd"] is None  # every seed 0.95: no spread
    cmp = next(c for c in doc["comparisons"] if c["metric"] == "image_AUROC")
    pooled = math.sqrt((statistics.variance(AUROCS) + statistics.variance(b_values)) / 2)
    assert (cmp["detect"], cmp["pooled_std"]) == (0.05, pytest.approx(pooled))
    assert cmp["seeds_needed"] == math.ceil(solve(nobs1=None, effect_size=0.05 / pooled))
    assert cmp["seeds_needed_note"] is None
    pixel = next(c for c in doc["comparisons"] if c["metric"] == "pixel_AUROC")
    assert (pixel["seeds_needed"], pixel["seeds_needed_note"]) == (None, "no spread to size it by")

    assert main(["check", str(tmp_path), "--detect", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert "seeds for 0.0001" in out
    assert f"more than {SEEDS_NEEDED_CAP}" in out  # 0.0001 against a std of 0.03


@pytest.mark.parametrize("bad", ["0", "-0.01", "nan", "inf"])
def test_detect_must_be_a_positive_finite_number(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    write_records(tmp_path, [make_record(seed=i, metrics={"image_AUROC": v}) for i, v in enumerate(AUROCS)])
    assert main(["check", str(tmp_path), "--detect", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"harness check: error: --detect must be a finite number > 0, got {float(bad)}"]
