"""Adaptive seed studies: the rounds on fixed per-seed values, the spec form, the check of a
stored study, and (slow) a real one on Ray that stops at the target on a stable category and
at the maximum on an unstable one, then resumes without running anything, and on other
hardware into the same store runs rounds of its own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.check import check
from harness.check.adaptive import AT_MAX, IN_PROGRESS, REACHED, halfwidth, next_step
from harness.check.summary import to_text
from harness.errors import HarnessError
from harness.record import SeedsPlan
from harness.report.sections import StabilityReport
from harness.spec import expand, validate_spec
from harness.store import ResultsStore
from tests.recordkit import make_record, write_records
from tests.test_sweep import SMOKE

PLAN = SeedsPlan(metric="image_AUROC", ci_halfwidth=0.01, min=3, max=7, round=2)
STABLE = dict.fromkeys(range(10), 0.9)  # every seed the same: a zero-width interval
UNSTABLE = {s: 0.7 + 0.2 * (s % 2) for s in range(10)}  # 0.7, 0.9, 0.7, ...: wide at any size


def test_a_stable_group_stops_at_the_target_after_its_first_round() -> None:
    step = next_step(STABLE, PLAN)
    assert (step.seeds, step.halfwidth, step.outcome) == (3, 0.0, REACHED)


def test_an_unstable_group_runs_to_the_maximum_in_rounds_and_never_beyond() -> None:
    seen = []
    for n in range(11):
        step = next_step({s: v for s, v in UNSTABLE.items() if s < n}, PLAN)
        seen.append((step.seeds, step.outcome))
    # min 3, then 2 more a round (5, 7); 7 is the maximum, not 3 + 2 + 2 + 2.
    assert seen[:3] == [(3, IN_PROGRESS)] * 3
    assert seen[3:5] == [(5, IN_PROGRESS)] * 2
    assert seen[5:7] == [(7, IN_PROGRESS)] * 2
    assert seen[7:] == [(7, AT_MAX)] * 4  # extra stored seeds do not move it past max
    assert next_step(UNSTABLE, PLAN).halfwidth == pytest.approx(halfwidth([UNSTABLE[s] for s in range(7)]))


def test_a_round_that_is_not_a_multiple_is_cut_at_the_maximum() -> None:
    plan = SeedsPlan(metric="image_AUROC", ci_halfwidth=0.01, min=3, max=6, round=2)
    assert next_step({s: UNSTABLE[s] for s in range(5)}, plan).seeds == 6


def test_resume_from_a_partial_store_is_the_round_it_was_in() -> None:
    """A killed round left seeds 0-3 of 0-4: the same round is due, with the half-width of the round before."""
    partial = {s: UNSTABLE[s] for s in range(4)}
    step = next_step(partial, PLAN)
    assert (step.seeds, step.outcome) == (5, IN_PROGRESS)
    assert step.halfwidth == pytest.approx(halfwidth([UNSTABLE[s] for s in range(3)]))
    missing = {s: v for s, v in UNSTABLE.items() if s != 1}  # a failed seed of the first round
    assert (next_step(missing, PLAN).seeds, next_step(missing, PLAN).halfwidth) == (3, None)


def test_a_group_that_narrows_stops_at_the_first_round_narrow_enough() -> None:
    values = {0: 0.7, 1: 0.9, 2: 0.8, **{s: 0.8 for s in range(3, 10)}}
    wide = halfwidth([0.7, 0.9, 0.8])
    plan = SeedsPlan(metric="image_AUROC", ci_halfwidth=halfwidth([values[s] for s in range(5)]), min=3, max=9, round=2)
    assert wide > plan.ci_halfwidth
    assert (next_step(values, plan).seeds, next_step(values, plan).outcome) == (5, REACHED)


def test_the_adaptive_form_loads_and_runs_its_first_round_as_seeds_0_to_min() -> None:
    raw = {"model": "patchcore", "data": {"categories": ["a", "b"]}, "repeats": 2}
    spec = validate_spec({**raw, "seeds": {"adaptive": {"ci_halfwidth": 0.005, "min": 3, "max": 9}}})
    assert spec.adaptive is not None
    assert (spec.adaptive.metric, spec.adaptive.round) == ("image_AUROC", 5)
    assert spec.seed_list() == [0, 1, 2]
    runs = expand(spec)
    assert [(r.category, r.seed, r.repeat) for r in runs[:3]] == [("a", 0, 0), ("a", 0, 1), ("a", 1, 0)]
    assert len(runs) == 2 * 3 * 2
    assert runs[0].seeds_plan == spec.adaptive
    # The plan is recorded, not keyed: seed 0 is the run it is in a study with `seeds: [0, 1, 2]`.
    assert runs[0].key() == expand(validate_spec({**raw, "seeds": [0, 1, 2]}))[0].key()


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ({"adaptive": {"ci_halfwidth": 0.01, "min": 1, "max": 5}}, "seeds.adaptive.min: Input should be greater"),
        ({"adaptive": {"ci_halfwidth": 0.01, "min": 6, "max": 5}}, "seeds.adaptive: min (6) is above max (5)"),
        ({"adaptive": {"ci_halfwidth": 0, "min": 2, "max": 5}}, "seeds.adaptive.ci_halfwidth: Input should be greater"),
        ({"adaptive": {"ci_halfwidth": 0.1, "min": 2, "max": 5, "metric": "fit_s"}}, "'fit_s' is not a quality metric"),
        ({"adaptive": {"ci_halfwidth": 0.1, "min": 2, "max": 5, "rounds": 2}}, "seeds.adaptive.rounds: unknown key"),
        ({"adaptive": {"ci_halfwidth": 0.1, "min": 2, "max": 5, "round": 0}}, "seeds.adaptive.round: Input should be"),
        ({"adaptiv": {}}, "seeds.adaptive: Field required"),
        ([], "seeds: no seeds: list at least one"),
    ],
)
def test_a_malformed_adaptive_form_is_a_one_line_error(seeds: Any, message: str) -> None:
    with pytest.raises(HarnessError) as err:
        validate_spec({"model": "patchcore", "data": {"categories": ["a"]}, "seeds": seeds})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_an_adaptive_search_is_refused() -> None:
    space = {"model_args.coreset_sampling_ratio": {"type": "uniform", "low": 0.1, "high": 0.2}}
    raw = {"model": "patchcore", "data": {"categories": ["a"]}, "study": "hpo", "search_space": space}
    with pytest.raises(HarnessError, match=r"seeds\.adaptive: only for study: seeds"):
        validate_spec({**raw, "seeds": {"adaptive": {"ci_halfwidth": 0.01, "min": 2, "max": 5}}})


def test_the_check_says_which_groups_reached_the_target_and_which_stopped_at_the_maximum(tmp_path: Path) -> None:
    plan = {"metric": "image_AUROC", "ci_halfwidth": 0.01, "min": 3, "max": 5, "round": 2}
    aurocs = [0.7, 0.9, 0.7, 0.9, 0.8]
    stable, unstable = _study("flat", [0.9] * 3, plan), _study("wavy", aurocs, plan)
    partial = _study("zz", aurocs[:4], plan)  # killed in its second round
    plain = [make_record(sweep="fixed", seed=s, metrics={"image_AUROC": 0.9}) for s in range(3)]
    rep = check(write_records(tmp_path, [*stable, *unstable, *partial, *plain]))
    got = {(g.sweep, g.category): g.adaptive for g in rep.groups}
    assert got[("fixed", "disc")] is None
    assert got[("s1", "flat")] == {**_named(plan), "seeds": 3, "halfwidth": 0.0, "outcome": REACHED}
    assert got[("s1", "wavy")] == {
        **_named(plan),
        "seeds": 5,
        "halfwidth": pytest.approx(halfwidth(aurocs)),
        "outcome": AT_MAX,
    }
    assert got[("s1", "zz")] == {
        **_named(plan),
        "seeds": 4,
        "halfwidth": pytest.approx(halfwidth(aurocs[:3])),
        "outcome": IN_PROGRESS,
    }
    text = to_text(rep)
    assert "adaptive seeds, added in rounds" in text
    wavy = [line for line in text.splitlines() if line.split()[:2] == ["wavy", "s1/patchcore"]]
    assert wavy[-1].endswith("stopped at the maximum")  # (the first is the stability table's row)
    report = StabilityReport(rep, "", "r").render([])
    assert "## Adaptive seed studies" in report
    assert "| flat | s1/patchcore | image_AUROC | 3 (max 5) | 0.0000 | 0.01 | reached the target |" in report


def _study(category: str, aurocs: list[float], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """An adaptive study's records of one category: seeds 0, 1, 2, ... with these AUROCs."""
    return [
        make_record(category=category, seed=s, metrics={"image_AUROC": v}, seeds_plan=plan)
        for s, v in enumerate(aurocs)
    ]


def _named(plan: dict[str, Any]) -> dict[str, Any]:
    """A plan as the check names its fields (``ci_halfwidth`` is the ``target``)."""
    return {"metric": plan["metric"], "target": plan["ci_halfwidth"], **{k: plan[k] for k in ("min", "max", "round")}}


# Measured here (synthetic data, 64 px, random-init PatchCore, 2 cores): image AUROC is 0.875 on
# weave for seeds 0-4 (a zero-width interval after the first round) and moves between 0.906
# and 1.0 on disc (CI half-width 0.0156, 0.0312, 0.0312 at 3, 4, 5 seeds). So weave stops at the
# target after 3 seeds and disc runs 3, 4, 5: 8 runs in three rounds, 23-40 s with Ray's start.
ADAPTIVE = {"metric": "image_AUROC", "ci_halfwidth": 0.005, "min": 3, "max": 5, "round": 1}


@pytest.mark.slow
def test_an_adaptive_study_stops_at_the_target_when_stable_and_at_the_maximum_when_not(
    tmp_path: Path,
    synth_root: Path,
    ray_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from harness.sweep import sweep

    doc = yaml.safe_load(SMOKE.read_text())
    doc.update(name="adaptive", seeds={"adaptive": ADAPTIVE}, repeats=1)
    doc["data"]["root"] = str(synth_root)
    spec = validate_spec(doc)
    results = tmp_path / "results"
    started = time.monotonic()
    first = sweep(spec, results)
    took = time.monotonic() - started
    out = capsys.readouterr().out
    print(f"adaptive study: {took:.0f} s")  # (-s shows it)
    assert (first.ok, first.failed) == (8, [])
    rounds = [line for line in out.splitlines() if line.startswith("adaptive seeds")]
    assert len(rounds) == 4, out  # three rounds run, and the line that says none is due
    assert "weave runs to 3 seeds" in rounds[0]
    assert "disc runs to 3 seeds" in rounds[0]
    assert "weave reached the target at 3 seeds (CI half-width 0.0000)" in rounds[1]
    assert "disc runs to 4 seeds" in rounds[1]
    assert "disc runs to 5 seeds" in rounds[2]
    assert "disc stopped at the maximum at 5 seeds" in rounds[3]
    stored = ResultsStore(results).records("adaptive").values()
    seeds = {c: sorted(r.seed for r in stored if r.category == c) for c in ("weave", "disc")}
    assert seeds == {"weave": [0, 1, 2], "disc": [0, 1, 2, 3, 4]}
    assert all(r.seeds_plan == spec.adaptive.plan() for r in stored)  # type: ignore[union-attr]

    rep = check(results)
    by_category = {g.category: g.adaptive for g in rep.groups}
    assert by_category["weave"]["outcome"] == REACHED  # type: ignore[index]
    assert by_category["disc"]["outcome"] == AT_MAX  # type: ignore[index]
    assert by_category["disc"]["halfwidth"] > ADAPTIVE["ci_halfwidth"]  # type: ignore[index]
    print({c: a["halfwidth"] for c, a in by_category.items() if a})

    again = sweep(spec, results)  # resume: the rounds are re-derived from the store, nothing runs
    assert (again.ok, again.failed, again.lost) == (0, [], [])
    assert len(ResultsStore(results).records("adaptive")) == 8

    # The study on other hardware (another ISA: another environment_id under no variant name)
    # into the same store: its rounds count its own runs, not the first machine's.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # the new cluster's workers start with it
    capsys.readouterr()
    other = sweep(spec, results)
    rounds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("adaptive seeds")]
    assert "weave runs to 3 seeds" in rounds[0], rounds
    assert "disc runs to 3 seeds" in rounds[0], rounds
    assert other.failed == []
    assert other.ok >= 6  # weave's 3, and disc's 3 to 5 (as the ISA moves its AUROCs)
    stored = ResultsStore(results).records("adaptive").values()
    seed0_envs = {r.environment_id for r in stored if r.seed == 0 and r.category == "weave"}
    assert len(seed0_envs) == 2  # the runs of seed 0 on each "machine"
    rep = check(results)
    weave = next(g for g in rep.groups if g.category == "weave")
    assert sorted(a["seeds"] for a in weave.env_adaptive.values()) == [3, 3]
