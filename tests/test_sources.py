"""Variance by source: the share of a metric's seed variance one stream makes alone, with the
F interval of a ratio of variances, against an independent computation of its quantiles and a
simulation of its coverage."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.special import betaincinv

from harness.check import check
from harness.check.sources import variance_ratio_interval
from tests.recordkit import PARAMS, make_record, write_records

REFERENCE = [0.800, 0.862, 0.904, 0.838, 0.921, 0.776]  # every stream follows the seed
SAMPLING = [0.842, 0.861, 0.857, 0.880, 0.839, 0.866]  # only the coreset follows it
INIT = [0.812, 0.870, 0.893, 0.829, 0.905, 0.801]  # only the backbone's initialisation does


def f_quantile(q: float, d1: int, d2: int) -> float:
    """The F distribution's quantile through the regularized incomplete beta function:
    F = (d2 / d1) x / (1 - x) with x ~ Beta(d1 / 2, d2 / 2)."""
    x = float(betaincinv(d1 / 2, d2 / 2, q))
    return d2 / d1 * x / (1 - x)


@pytest.mark.parametrize(("n_a", "n_b"), [(2, 2), (3, 5), (6, 6), (10, 4), (50, 30)])
def test_the_interval_is_the_f_interval(n_a: int, n_b: int) -> None:
    var_a, var_b = 0.0004, 0.0009
    low, high = variance_ratio_interval(var_a, n_a, var_b, n_b)
    ratio = var_a / var_b
    assert low == pytest.approx(ratio / f_quantile(0.975, n_a - 1, n_b - 1), rel=1e-9)
    assert high == pytest.approx(ratio / f_quantile(0.025, n_a - 1, n_b - 1), rel=1e-9)
    assert low < ratio < high


@pytest.mark.parametrize(("n", "true_ratio"), [(5, 0.25), (10, 1.0), (30, 0.5)])
def test_the_interval_covers_the_true_share_95_percent_of_the_time(n: int, true_ratio: float) -> None:
    """Normal metrics over seeds with a known variance ratio: 4000 studies, each source and
    reference run with n seeds; the interval holds the ratio in 95% of them (+-1.2%, about 3.5
    standard errors)."""
    rng = np.random.default_rng(7)
    a = rng.normal(0.9, 0.01 * np.sqrt(true_ratio), size=(4000, n))
    b = rng.normal(0.9, 0.01, size=(4000, n))
    covered = 0
    for va, vb in zip(a.var(axis=1, ddof=1), b.var(axis=1, ddof=1), strict=True):
        low, high = variance_ratio_interval(float(va), n, float(vb), n)
        covered += low <= true_ratio <= high
    assert abs(covered / 4000 - 0.95) < 0.012


def _records(sweep: str = "s1") -> list[dict[str, Any]]:
    def pinned(source: str) -> dict[str, Any]:
        params = copy.deepcopy(PARAMS["patchcore"])
        params["streams"] = {name: "seed" if name == source else 0 for name in ("init", "order", "sampling")}
        return params

    out = [make_record(sweep=sweep, seed=i, metrics={"image_AUROC": v}) for i, v in enumerate(REFERENCE)]
    for source, values in (("sampling", SAMPLING), ("init", INIT)):
        p = pinned(source)
        out += [make_record(sweep=sweep, seed=i, params=p, metrics={"image_AUROC": v}) for i, v in enumerate(values)]
    return out


def test_the_checker_gives_each_sources_share_of_the_reference_variance(tmp_path: Path) -> None:
    rep = check(write_records(tmp_path, _records()))
    labels = sorted(g.label for g in rep.groups)
    assert labels == ["s1/patchcore", "s1/patchcore [init only]", "s1/patchcore [sampling only]"]
    got = {s.source: s for s in rep.sources if s.metric == "image_AUROC"}
    assert sorted(got) == ["init", "sampling"]
    ref_var = np.var(REFERENCE, ddof=1)
    for source, values in (("sampling", SAMPLING), ("init", INIT)):
        share = got[source]
        assert share.label == "s1/patchcore"
        assert share.n == share.n_reference == 6
        assert share.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        assert share.share == pytest.approx(np.var(values, ddof=1) / ref_var, rel=1e-12)
        assert share.share_low == pytest.approx(share.share / f_quantile(0.975, 5, 5), rel=1e-9)
        assert share.share_high == pytest.approx(share.share / f_quantile(0.025, 5, 5), rel=1e-9)
    assert got["sampling"].share < 0.2 < 0.5 < got["init"].share
    assert rep.to_json()["sources"][0]["source"] in {"init", "sampling"}


def test_sources_need_their_reference(tmp_path: Path) -> None:
    """Source groups alone (no study with every stream following the seed) give no share."""
    records = [r for r in _records() if "streams" in r["params"]]
    assert check(write_records(tmp_path, records)).sources == []


def test_the_report_shows_each_sources_share(tmp_path: Path) -> None:
    from harness.report.sections import StabilityReport

    rep = check(write_records(tmp_path / "results", _records()))
    text = StabilityReport(rep, "harness report results", "report").render([])
    section = text.split("## Variance by source", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| disc ")]
    sampling = next(s for s in rep.sources if s.source == "sampling" and s.metric == "image_AUROC")
    assert len(rows) == 4  # 2 sources x image and pixel AUROC
    assert f"{sampling.share:.3f} [{sampling.share_low:.3f}, {sampling.share_high:.3f}]" in section
    assert "[sampling only]" in text.split("## Variance by source", 1)[0]  # its group's stability row
