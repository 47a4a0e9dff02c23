"""Across categories: the checker's aggregates against rliable's own functions on fixed inputs
(point estimates exactly, intervals with the same resamples and within a Monte-Carlo tolerance
with their own), their coverage by simulation, the JSON, the memo and the report."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import norm

from harness.check import check
from harness.check.across import aggregates, improvement, improvement_resamples, mean_and_iqm
from harness.check.stats import ASYMPTOTIC_FROM, N_RESAMPLES
from harness.cli import main
from tests.recordkit import make_record, write_records

metrics = pytest.importorskip("rliable.metrics")  # numpy and scipy only: imports wherever rliable installs

# Runs x categories, as rliable lays scores out; ties within and across models on purpose.
SCORES_X = np.array(
    [
        [0.91, 0.62, 0.88, 0.75],
        [0.93, 0.70, 0.88, 0.71],
        [0.95, 0.55, 0.90, 0.80],
        [0.90, 0.81, 0.84, 0.74],
        [0.94, 0.60, 0.86, 0.77],
    ]
)
SCORES_Y = np.array(
    [
        [0.89, 0.60, 0.88, 0.79],
        [0.92, 0.58, 0.83, 0.80],
        [0.91, 0.66, 0.87, 0.70],
        [0.90, 0.52, 0.85, 0.78],
        [0.86, 0.61, 0.88, 0.73],
    ]
)
# Monte-Carlo tolerance of an endpoint against rliable's own resamples: two percentile
# estimates from 9999 resamples each differ by about 1% of the interval's width (one standard
# deviation, for a normal-shaped bootstrap distribution); 6% is six of them.
MC_TOLERANCE = 0.06
FIXED_REPS = 1000  # resamples of the exact comparisons (rliable's loop is Python, a resample at a time)


def columns(scores: np.ndarray) -> list[np.ndarray]:
    return [scores[:, m].copy() for m in range(scores.shape[1])]


def aggregate(s: np.ndarray) -> np.ndarray:
    return np.array([metrics.aggregate_mean(s), metrics.aggregate_iqm(s)])


def improves(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([metrics.probability_of_improvement(x, y)])


def rliable_draws(seed: int, shapes: list[tuple[int, int]], reps: int) -> list[np.ndarray]:
    """The run indices rliable's stratified bootstraps draw, per score matrix (reps, runs, tasks):
    for each resample, each matrix's ``np.random.choice(runs, (runs, tasks))`` from numpy's
    global generator, in argument order (``StratifiedBootstrap.update_indices``,
    ``StratifiedIndependentBootstrap._get_indices``): column m resamples task m's runs."""
    np.random.seed(seed)
    draws = [[np.random.choice(shape[0], shape, replace=True) for shape in shapes] for _ in range(reps)]
    return [np.stack([d[i] for d in draws]) for i in range(len(shapes))]


def percentiles(boot: np.ndarray) -> np.ndarray:
    """(2, k): rliable's percentile interval of (reps, k) bootstrap statistics (arch's np.percentile)."""
    return np.percentile(boot, [2.5, 97.5], axis=0)


@pytest.fixture
def rliable_library(monkeypatch: pytest.MonkeyPatch) -> Any:
    """rliable's bootstrap module (``rliable.library``), or a skip saying why.

    rliable 1.2.0 wants arch < 8, whose numpy-2 builds (7.x) fail to import under pandas 3;
    arch 8 imports, but calls the generator argument rliable passes (``random_state``) ``seed``.
    Where arch 8 is installed, the keyword is handed on under its new name and nothing else
    changes (rliable's resamples come from numpy's global generator either way)."""
    try:
        import arch.bootstrap as arch_bs
        import rliable.library as rly
    except Exception as exc:  # arch 7 under pandas 3: a TypeError at import
        pytest.skip(f"rliable.library does not import here: {type(exc).__name__}: {exc}")
    for cls in (arch_bs.IIDBootstrap, arch_bs.IndependentSamplesBootstrap):
        init = cls.__init__
        if "random_state" not in inspect.signature(init).parameters:

            def renamed(self: Any, *args: Any, random_state: Any = None, _init: Any = init, **kw: Any) -> None:
                kw.setdefault("seed", random_state)  # a subclass passes seed= on to its base itself
                _init(self, *args, **kw)

            monkeypatch.setattr(cls, "__init__", renamed)
    return rly


def test_point_estimates_are_rliables() -> None:
    mean, _, _, iqm, _, _ = aggregates([columns(SCORES_X)])[0]
    assert mean == pytest.approx(metrics.aggregate_mean(SCORES_X), abs=1e-12)
    assert iqm == pytest.approx(metrics.aggregate_iqm(SCORES_X), abs=1e-12)
    ((p, _, _),) = improvement([list(zip(columns(SCORES_X), columns(SCORES_Y), strict=True))])
    assert p == pytest.approx(metrics.probability_of_improvement(SCORES_X, SCORES_Y), abs=1e-12)
    ((same, _, _),) = improvement([list(zip(columns(SCORES_X), columns(SCORES_X), strict=True))])
    assert same == 0.5 == metrics.probability_of_improvement(SCORES_X, SCORES_X)


def our_aggregates_on(ix: np.ndarray) -> np.ndarray:
    """Our bootstrap mean and IQM of X on rliable's resamples of it: (reps, 2)."""
    return mean_and_iqm(columns(SCORES_X), [ix[:, :, k] for k in range(ix.shape[2])]).T


def our_improvement_on(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Our bootstrap P(X>Y) over categories on rliable's resamples of X and of Y: (reps, 1)."""
    counts = [(_counts(ix[:, :, k], ix.shape[1]), _counts(iy[:, :, k], iy.shape[1])) for k in range(ix.shape[2])]
    return improvement_resamples(list(zip(columns(SCORES_X), columns(SCORES_Y), strict=True)), counts)[:, None]


def test_on_the_same_resamples_the_statistics_are_rliables() -> None:
    """rliable's statistics (its metrics functions) on each of rliable's resamples, one at a time
    as its bootstrap applies them, against ours vectorised: equal to 1e-12, and so the intervals."""
    ix, iy = rliable_draws(5, [SCORES_X.shape, SCORES_Y.shape], FIXED_REPS)
    tasks = np.arange(SCORES_X.shape[1])
    theirs = np.array([aggregate(SCORES_X[ix[r], tasks]) for r in range(FIXED_REPS)])
    theirs_p = np.array([improves(SCORES_X[ix[r], tasks], SCORES_Y[iy[r], tasks]) for r in range(FIXED_REPS)])
    boot, p = our_aggregates_on(ix), our_improvement_on(ix, iy)
    np.testing.assert_allclose(boot, theirs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p, theirs_p, rtol=0, atol=1e-12)
    np.testing.assert_allclose(percentiles(boot), percentiles(theirs), rtol=0, atol=1e-12)
    np.testing.assert_allclose(percentiles(p), percentiles(theirs_p), rtol=0, atol=1e-12)


def test_on_the_same_resamples_the_intervals_are_rliable_librarys(rliable_library: Any) -> None:
    """rliable's own get_interval_estimates, its resamples fixed by numpy's global seed, against
    our statistics on those resamples: the same percentile intervals, to 1e-12."""
    rly = rliable_library
    np.random.seed(5)
    _, theirs = rly.get_interval_estimates({"x": SCORES_X}, aggregate, method="percentile", reps=FIXED_REPS)
    (ix,) = rliable_draws(5, [SCORES_X.shape], FIXED_REPS)
    np.testing.assert_allclose(percentiles(our_aggregates_on(ix)), theirs["x"], rtol=0, atol=1e-12)
    np.random.seed(5)
    pair = [SCORES_X, SCORES_Y]
    _, theirs = rly.get_interval_estimates({"x": pair}, improves, method="percentile", reps=FIXED_REPS)
    ix, iy = rliable_draws(5, [SCORES_X.shape, SCORES_Y.shape], FIXED_REPS)  # X's, then Y's, each resample
    np.testing.assert_allclose(percentiles(our_improvement_on(ix, iy)), theirs["x"], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_intervals_are_rliable_librarys_within_monte_carlo_tolerance(rliable_library: Any) -> None:
    """Our seeded intervals against rliable's with its own resamples (9999 each): every endpoint
    within MC_TOLERANCE of the width of rliable's interval."""
    rly = rliable_library
    np.random.seed(0)
    _, theirs = rly.get_interval_estimates({"x": SCORES_X}, aggregate, method="percentile", reps=N_RESAMPLES)
    np.random.seed(0)
    _, theirs_p = rly.get_interval_estimates(
        {"x": [SCORES_X, SCORES_Y]}, improves, method="percentile", reps=N_RESAMPLES
    )
    _, mean_lo, mean_hi, _, iqm_lo, iqm_hi = aggregates([columns(SCORES_X)])[0]
    ((_, lo, hi),) = improvement([list(zip(columns(SCORES_X), columns(SCORES_Y), strict=True))])
    ours = np.array([[mean_lo, iqm_lo, lo], [mean_hi, iqm_hi, hi]])
    expected = np.hstack([theirs["x"], theirs_p["x"]])
    off = np.abs(ours - expected) / (expected[1] - expected[0])
    assert off.max() <= MC_TOLERANCE, off


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Resample indices (r, n) as counts of each seed (r, n), float32 as the checker weighs them."""
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float32)


def test_from_many_seeds_the_asymptotic_interval_is_the_bootstraps() -> None:
    """From ASYMPTOTIC_FROM seeds a side, P(A>B) over categories takes the asymptotic interval:
    each end within 0.01 of the percentile bootstrap's, with no effect, a small and a clear one, ties."""
    rng = np.random.default_rng(3)
    n = ASYMPTOTIC_FROM + 20
    for shift in (0.0, 0.01, 0.03):
        cats = [
            (np.round(rng.normal(0.8 + shift, 0.02, n), 3), np.round(rng.normal(0.8, 0.02, n), 3)) for _ in range(3)
        ]
        ((_, lo, hi),) = improvement([cats])
        draws = [tuple(_counts(rng.integers(0, n, (N_RESAMPLES, n)), n) for _ in "ab") for _ in cats]
        b_lo, b_hi = np.percentile(improvement_resamples(cats, draws), [2.5, 97.5])  # type: ignore[arg-type]
        assert abs(lo - b_lo) < 0.01, (shift, lo, b_lo)
        assert abs(hi - b_hi) < 0.01, (shift, hi, b_hi)


@pytest.mark.slow
def test_the_intervals_cover_the_truth_by_simulation() -> None:
    """400 studies of 5 categories x 10 seeds from known normal distributions: how often each 95%
    interval holds the true value. Percentile bootstraps of few seeds run a little narrow (the
    bootstrap's variance divides by n, not n - 1: about 94% expected at 10 seeds); between 90%
    and 98% passes."""
    rng = np.random.default_rng(11)
    centres = np.array([0.80, 0.85, 0.90, 0.95, 1.00])  # symmetric: the mixture's IQM is its mean, 0.9
    shift, sd, seeds, studies = 0.02, 0.03, 10, 400
    true_p = float(np.mean(norm.cdf(shift / (sd * math.sqrt(2))) * np.ones(len(centres))))
    rows, pairs = [], []
    for _ in range(studies):
        a = [rng.normal(c + shift, sd, seeds) for c in centres]
        b = [rng.normal(c, sd, seeds) for c in centres]
        rows.append(b)
        pairs.append(list(zip(a, b, strict=True)))
    found = np.array(aggregates(rows))
    covered = {
        "mean": np.mean((found[:, 1] <= 0.9) & (found[:, 2] >= 0.9)),
        "iqm": np.mean((found[:, 4] <= 0.9) & (found[:, 5] >= 0.9)),
    }
    p = np.array(improvement(pairs))
    covered["p"] = np.mean((p[:, 1] <= true_p) & (p[:, 2] >= true_p))
    assert all(0.90 <= c <= 0.98 for c in covered.values()), covered


def across_store(root: Path) -> Path:
    """Two models on two categories, five seeds each: A ahead on disc, behind on weave."""
    records = []
    for sweep, model, disc, weave in (
        ("a", "patchcore", [0.90, 0.92, 0.94, 0.96, 0.98], [0.70, 0.72, 0.74, 0.76, 0.78]),
        ("b", "ganomaly", [0.80, 0.82, 0.84, 0.86, 0.88], [0.75, 0.77, 0.79, 0.81, 0.83]),
    ):
        for category, values in (("disc", disc), ("weave", weave)):
            records += [
                make_record(sweep=sweep, model=model, category=category, seed=s, metrics={"image_AUROC": v})
                for s, v in enumerate(values)
            ]
    return write_records(root, records)


def test_the_json_has_the_aggregates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    across_store(tmp_path)
    assert main(["check", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["aggregates"]
    by = {(m["label"], m["metric"]): m for m in doc["models"]}
    assert set(by) == {("a/patchcore", "image_AUROC"), ("a/patchcore", "pixel_AUROC"), ("b/ganomaly", "image_AUROC")}
    a = by[("a/patchcore", "image_AUROC")]
    scores = np.array([[0.90, 0.92, 0.94, 0.96, 0.98], [0.70, 0.72, 0.74, 0.76, 0.78]]).T
    assert (a["categories"], a["n_categories"], a["n_seeds"]) == (["disc", "weave"], 2, [5, 5])
    assert a["mean"]["value"] == pytest.approx(metrics.aggregate_mean(scores))
    assert a["iqm"]["value"] == pytest.approx(metrics.aggregate_iqm(scores))
    assert a["mean"]["ci_low"] < a["mean"]["value"] < a["mean"]["ci_high"]
    (cmp,) = doc["comparisons"]
    assert (cmp["a"], cmp["b"], cmp["metric"], cmp["categories"]) == (
        "a/patchcore",
        "b/ganomaly",
        "image_AUROC",
        ["disc", "weave"],
    )
    assert cmp["p_a_better"] == pytest.approx((1.0 + 0.12) / 2)  # disc: every pair; weave: 3 of 25 pairs
    assert (cmp["n_a"], cmp["n_b"], cmp["verdict"]) == (5, 5, "within noise")
    main(["check", str(tmp_path)])
    out = capsys.readouterr().out
    assert "across categories, over every category and seed" in out
    assert "across categories, P(A beats B) averaged over categories:" in out


def test_the_aggregates_are_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second check of the same store computes none of them again: the memo answers."""
    import harness.check.groups as groups

    across_store(tmp_path)
    first = check(tmp_path).to_json()

    def refuse(*_: Any) -> Any:
        raise AssertionError("recomputed")

    for name in ("aggregates", "improvement", "probability_of_improvement"):
        monkeypatch.setattr(groups, name, refuse)
    monkeypatch.setattr("harness.check.power.mdd_factor", refuse)
    monkeypatch.setattr("harness.check.power.seeds_needed", refuse)
    assert check(tmp_path).to_json() == first


def test_the_report_has_the_across_categories_section_and_profile(tmp_path: Path) -> None:
    from harness.report import write_report

    root = across_store(tmp_path / "results")
    out, plots = write_report(check(root), tmp_path / "r.md", "harness report results")
    md = out.read_text()
    section = md.split("## Across categories")[1].split("\n## ")[0]
    assert "| a/patchcore | image_AUROC | 2 | 5 | 0.840 [" in section
    assert "| image_AUROC | a/patchcore | b/ganomaly | 2 | 0.56 [" in section
    assert "## What the seeds could detect" in md
    assert "profile-categories.png" in [p.name for p in plots]
