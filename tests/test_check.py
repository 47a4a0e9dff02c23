"""The checker on hand-built records with known answers: numbers, verdicts, JSON, errors."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import bootstrap

from harness.check import check
from harness.check.stats import BOOTSTRAP_SEED, N_RESAMPLES
from harness.cli import main
from tests import recordkit as rk
from tests.recordkit import GPU_ENV, VALIDATION, make_record, scores_for, write_records

AUROCS = [0.80, 0.82, 0.84, 0.86, 0.88]


def seeds_of(values: list[float], **kw: Any) -> list[dict[str, Any]]:
    return [make_record(seed=i, metrics={"image_AUROC": v}, **kw) for i, v in enumerate(values)]


def check_json(root: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = main(["check", str(root), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def only_group(doc: dict[str, Any], **match: str) -> dict[str, Any]:
    found = [g for g in doc["groups"] if all(g[k] == v for k, v in match.items())]
    assert len(found) == 1, [g["label"] for g in doc["groups"]]
    return found[0]


def test_seed_variance_has_known_mean_std_and_a_seeded_bootstrap_ci(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_records(tmp_path, seeds_of(AUROCS) + seeds_of([0.5, 0.9, 0.7], model="ganomaly"))
    code, doc = check_json(tmp_path, capsys=capsys)
    assert code == 0
    m = only_group(doc, model="patchcore")["metrics"]["image_AUROC"]
    assert m["n"] == 5
    assert m["mean"] == pytest.approx(0.84)
    assert m["std"] == pytest.approx(statistics.stdev(AUROCS))  # 0.0316: sample std (n - 1)
    assert (m["min"], m["max"]) == (0.80, 0.88)
    assert m["cv"] == pytest.approx(statistics.stdev(AUROCS) / 0.84)
    # The same interval scipy gives for these five values alone: batching with the other
    # group's rows changed nothing, and the seed makes it the same on every call.
    alone = bootstrap(
        (np.array(AUROCS),), np.mean, method="BCa", n_resamples=N_RESAMPLES, rng=np.random.default_rng(BOOTSTRAP_SEED)
    ).confidence_interval
    assert (m["ci_low"], m["ci_high"]) == (pytest.approx(alone.low), pytest.approx(alone.high))
    assert 0.80 < m["ci_low"] < 0.84 < m["ci_high"] < 0.88
    assert only_group(doc, model="patchcore")["metrics"]["fit_s"]["mean"] == 1.0


def test_an_interval_does_not_depend_on_the_rest_of_the_store(tmp_path: Path) -> None:
    write_records(tmp_path / "a", seeds_of(AUROCS))
    write_records(tmp_path / "b", seeds_of(AUROCS) + seeds_of([0.7, 0.75, 0.9, 0.6, 0.8], category="weave"))
    ci = [next(g for g in check(tmp_path / s).groups if g.category == "disc").stats["image_AUROC"] for s in ("a", "b")]
    assert (ci[0].ci_low, ci[0].ci_high) == (ci[1].ci_low, ci[1].ci_high)


def test_an_interval_is_the_same_alone_and_among_thousands_of_rows() -> None:
    """Rows go to scipy in chunks of 512 with a batch size that depends on the chunk: no effect."""
    from harness.check.stats import Stat, bootstrap_means

    rng = np.random.default_rng(7)
    alone = Stat(np.array(AUROCS), np.arange(5))
    crowd = [Stat(rng.uniform(0.5, 1.0, 5), np.arange(5)) for _ in range(1500)]
    twin = Stat(np.array(AUROCS), np.arange(5))
    bootstrap_means([alone])
    bootstrap_means([*crowd[:1100], twin, *crowd[1100:]])  # in the third chunk
    assert (twin.ci_low, twin.ci_high) == (alone.ci_low, alone.ci_high)
    assert all(s.ci_low is not None and s.ci_low < s.mean < s.ci_high for s in crowd)


def test_repeats_with_equal_hashes_are_bitwise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, seeds_of(AUROCS[:2]) + seeds_of(AUROCS[:2], repeat=1))
    code, doc = check_json(tmp_path, "--strict", capsys=capsys)
    det = only_group(doc)["determinism"]
    assert code == 0
    assert (det["verdict"], det["pairs"], det["bitwise"], det["max_score_diff"]) == ("bitwise", 2, 2, 0.0)
    assert det["differing"] == []


def test_a_planted_score_difference_diverges_and_names_the_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    second = make_record(seed=1, repeat=1, metrics={"image_AUROC": 0.78})  # other scores than seed 1's first
    records = [*seeds_of(AUROCS[:2]), make_record(repeat=1, metrics={"image_AUROC": 0.80}), second]
    write_records(tmp_path, records)
    code, doc = check_json(tmp_path, "--strict", capsys=capsys)
    det = only_group(doc)["determinism"]
    assert code == 1  # --strict: a same-seed repeat diverged
    assert (det["verdict"], det["bitwise"], det["diverged"]) == ("diverged", 1, 1)
    (pair,) = det["differing"]
    assert (pair["seed"], pair["repeat_a"], pair["repeat_b"], pair["run_b"]) == (1, 0, 1, second["run_id"])
    planted = np.abs(np.subtract(scores_for(0.82), scores_for(0.78)))
    assert pair["max_score_diff"] == pytest.approx(planted.max())
    assert pair["metric_diffs"]["image_AUROC"] == pytest.approx(-0.04)
    assert det["max_metric_diff"] == pytest.approx(0.04)
    assert main(["check", str(tmp_path)]) == 0  # without --strict, a verdict is not a failure
    assert "1 of 2 pairs differ; worst: seed 1" in capsys.readouterr().out


def test_tiny_differences_are_within_tolerance_and_the_tolerance_is_settable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nudged = [s + 1e-7 for s in scores_for(0.9)]  # the same ranks: the same image metrics
    write_records(tmp_path, [make_record(), make_record(repeat=1, metrics={"pixel_AUROC": 0.95 + 1e-6}, scores=nudged)])
    code, doc = check_json(tmp_path, "--strict", capsys=capsys)
    det = only_group(doc)["determinism"]
    assert (code, det["verdict"]) == (0, "within_tolerance")
    assert det["max_score_diff"] == pytest.approx(1e-7, rel=1e-3)
    code, doc = check_json(tmp_path, "--strict", "--tolerance", "1e-9", capsys=capsys)
    assert (code, only_group(doc)["determinism"]["verdict"]) == (1, "diverged")


def test_without_repeats_determinism_is_untested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, seeds_of(AUROCS))
    _, doc = check_json(tmp_path, capsys=capsys)
    assert only_group(doc)["determinism"]["verdict"] == "untested"
    assert doc["determinism"] == {"bitwise": 0, "within_tolerance": 0, "diverged": 0, "untested": 1}
    main(["check", str(tmp_path)])
    assert "untested (no repeats; set repeats: 2)" in capsys.readouterr().out  # and how to test it


def test_a_planted_cross_environment_delta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu = seeds_of(AUROCS)
    gpu = seeds_of([v + 0.02 for v in AUROCS], env=GPU_ENV)
    write_records(tmp_path, cpu + gpu)
    _, doc = check_json(tmp_path, capsys=capsys)
    group = only_group(doc)
    assert group["environment_ids"] == ["cpu-epyc-2t", "gpu-h200"]
    assert group["metrics"]["image_AUROC"]["n"] == 5  # a seed counts once, whatever ran it
    assert group["metrics"]["image_AUROC"]["mean"] == pytest.approx(0.85)
    (cross,) = group["cross_environment"]
    assert (cross["environment_a"], cross["environment_b"]) == ("cpu-epyc-2t", "gpu-h200")
    assert cross["seeds"] == [0, 1, 2, 3, 4]
    assert cross["same_machine"] is False
    assert cross["deltas"]["image_AUROC"]["mean"] == pytest.approx(0.02)
    assert cross["deltas"]["image_AUROC"]["max_abs"] == pytest.approx(0.02)
    assert cross["deltas"]["pixel_AUROC"] == {"mean": 0.0, "max_abs": 0.0}
    assert cross["verdict"] == "differs"
    assert cross["delta_over_seed_std"] == pytest.approx(0.02 / statistics.stdev([v + 0.01 for v in AUROCS]))
    diff = cross["fingerprint_diff"]
    assert diff["device"] == ["cpu", "cuda:0"]
    assert diff["gpu_name"] == [None, "NVIDIA H200"]
    assert "environment_id" not in diff
    assert "machine_id" not in diff
    assert "torch" not in diff
    assert only_group(doc)["determinism"]["verdict"] == "untested"  # another environment is not a repeat


@pytest.mark.parametrize(
    ("a", "b", "verdict", "p"),
    [
        ([0.90, 0.91, 0.92, 0.93, 0.94], [0.60, 0.61, 0.62, 0.63, 0.64], "A better", 1.0),
        ([0.60, 0.61, 0.62, 0.63, 0.64], [0.90, 0.91, 0.92, 0.93, 0.94], "B better", 0.0),
        (AUROCS, [0.81, 0.83, 0.85, 0.87, 0.79], "within noise", 0.6),  # 15 of 25 pairs
        ([0.90, 0.91], [0.60, 0.61], "too few seeds", 1.0),
    ],
)
def test_model_comparison_by_probability_of_improvement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], a: list[float], b: list[float], verdict: str, p: float
) -> None:
    # Sweep names order the pair: "a" is A.
    write_records(tmp_path, seeds_of(a, sweep="a") + seeds_of(b, sweep="b", model="ganomaly"))
    _, doc = check_json(tmp_path, capsys=capsys)
    (cmp,) = doc["comparisons"]  # GANomaly has no pixel AUROC: image AUROC only
    assert (cmp["a"], cmp["b"], cmp["metric"], cmp["n_a"], cmp["n_b"]) == (
        "a/patchcore",
        "b/ganomaly",
        "image_AUROC",
        len(a),
        len(b),
    )
    assert cmp["p_a_better"] == pytest.approx(p)
    assert cmp["ci_low"] <= cmp["p_a_better"] <= cmp["ci_high"]
    assert cmp["verdict"] == verdict
    if verdict == "within noise":
        assert cmp["ci_low"] < 0.5 < cmp["ci_high"]


def test_only_runs_on_the_same_data_are_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = make_record(seed=0)["params"]
    other["data"]["sha256"] = "different images"
    write_records(tmp_path, seeds_of(AUROCS, sweep="a") + seeds_of(AUROCS, sweep="b", params=other))
    _, doc = check_json(tmp_path, capsys=capsys)
    assert len(doc["groups"]) == 2
    assert doc["comparisons"] == []


def test_failed_runs_are_counted_and_named_never_averaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    failed = make_record(seed=3, status="failed")
    write_records(tmp_path, [*seeds_of(AUROCS[:3]), failed])
    _, doc = check_json(tmp_path, capsys=capsys)
    group = only_group(doc)
    assert group["metrics"]["image_AUROC"]["n"] == 3
    assert group["metrics"]["image_AUROC"]["mean"] == pytest.approx(0.82)
    assert group["failed"] == [
        {
            "run_id": failed["run_id"],
            "seed": 3,
            "repeat": 0,
            "error": "OutOfMemoryError: CUDA out of memory (at run.py:301)",
            "path": f"s1/runs/{failed['run_id']}.json",
        }
    ]
    assert doc["records"] == {"files": 4, "ok": 3, "failed": 1, "trials": 0, "malformed": 0, "corrupt": 0}
    assert main(["check", str(tmp_path)]) == 0
    assert (
        f"patchcore disc seed=3 r0 in s1/patchcore: OutOfMemoryError: CUDA out of memory (at run.py:301) "
        f"(s1/runs/{failed['run_id']}.json)" in (capsys.readouterr().out)
    )


def test_a_single_seed_says_so_instead_of_a_std_of_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, seeds_of([0.8]))
    _, doc = check_json(tmp_path, capsys=capsys)
    group = only_group(doc)
    assert group["note"] == "single seed: no spread to report"
    assert {k: group["metrics"]["image_AUROC"][k] for k in ("n", "std", "ci_low", "ci_high", "cv")} == {
        "n": 1,
        "std": None,
        "ci_low": None,
        "ci_high": None,
        "cv": None,
    }
    main(["check", str(tmp_path)])
    assert "0.800 (1 seed)" in capsys.readouterr().out


def test_malformed_records_are_named_and_the_rest_still_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_records(tmp_path, seeds_of(AUROCS))
    runs = tmp_path / "s1" / "runs"
    (runs / "aaaa.json").write_text("{not json")
    missing = make_record(seed=9)
    del missing["metrics"]
    (runs / f"{missing['run_id']}.json").write_text(json.dumps(missing))
    wrong = make_record(seed=8)
    wrong["seed"] = "eight"
    (runs / f"{wrong['run_id']}.json").write_text(json.dumps(wrong))
    (runs / "bbbb.json").write_text(json.dumps(make_record(seed=7)))  # run_id is not the file name
    code, doc = check_json(tmp_path, capsys=capsys)
    assert code == 0
    assert only_group(doc)["metrics"]["image_AUROC"]["n"] == 5
    errors = {m["path"]: m["error"] for m in doc["malformed"]}
    assert errors["s1/runs/aaaa.json"].startswith("not valid JSON")
    assert "metrics" in errors[f"s1/runs/{missing['run_id']}.json"]
    assert "$.seed" in errors[f"s1/runs/{wrong['run_id']}.json"]
    assert "does not match the file name" in errors["s1/runs/bbbb.json"]
    main(["check", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"malformed record {runs / 'aaaa.json'}: not valid JSON" in err
    assert len(err.strip().splitlines()) == 4  # one line a file


def test_trials_stay_out_of_the_groups_and_feed_the_search_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trials = []
    for i, (val, stopped) in enumerate([(0.6, False), (0.7, False), (0.4, True)]):
        trial = make_record(model="ganomaly", sweep="hpo", repeat=i, role="trial", study="hpo")
        curve = [{"epoch": 1, "val_image_AUROC": 0.5}, {"epoch": 2, "val_image_AUROC": val}][: 1 if stopped else 2]
        trial.update(
            metrics={"val_image_AUROC": val},
            predictions=None,
            validation={**VALIDATION, "curve": curve, "stopped_early": stopped},
        )
        trials.append(trial)
    selection = {"metric": "val_image_AUROC", "mode": "max", "value": 0.7, "trial_run_id": trials[1]["run_id"]}
    selection |= {"config": {"model_args.lr": 0.001}, "rule": "max of last-epoch val_image_AUROC"}
    best = seeds_of([0.55, 0.65, 0.6], model="ganomaly", sweep="hpo", role="best", study="hpo", selection=selection)
    write_records(tmp_path, trials + best)
    _, doc = check_json(tmp_path, capsys=capsys)
    group = only_group(doc)
    assert (group["label"], group["role"], group["metrics"]["image_AUROC"]["n"]) == ("hpo/ganomaly [best]", "best", 3)
    assert doc["records"]["trials"] == 3
    (search,) = doc["searches"]
    assert (search["n_trials"], search["n_ok"], search["n_stopped_early"]) == (3, 3, 1)
    (sel,) = search["selections"]
    assert (sel["group"], sel["val_score"], sel["trial_run_id"]) == ("hpo/ganomaly [best]", 0.7, trials[1]["run_id"])


JSON_KEYS = {
    "schema",
    "tolerance",
    "records",
    "malformed",
    "corrupt",
    "determinism",
    "groups",
    "comparisons",
    "searches",
    "across_environments",
    "detect",
    "aggregates",
    "sources",
}
GROUP_KEYS = {"id", "label", "sweep", "model", "category", "role", "config_id", "n_runs", "seeds", "repeats"}
GROUP_KEYS |= {"environment_ids", "data_sha256", "note", "failed", "metrics", "determinism", "cross_environment"}
GROUP_KEYS |= {"metrics_by_environment", "adaptive", "adaptive_by_environment"}
PLAN = {"metric": "image_AUROC", "ci_halfwidth": 0.01, "min": 2, "max": 4, "round": 2}


def nested_keys(doc: Any, prefix: str = "") -> set[str]:
    """Every key of a JSON document, metric names and fingerprint fields (data, not keys) left out."""
    keys: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            keyed = ("metrics", "deltas", "metric_diffs", "fingerprint_diff", "env_diff", "config", "by_environment")
            if prefix.endswith(keyed):
                keys |= nested_keys(v, prefix)  # keyed by metric or field name
                continue
            keys.add(k)
            keys |= nested_keys(v, k)
    elif isinstance(doc, list):
        for v in doc:
            keys |= nested_keys(v, prefix)
    return keys


def test_the_json_keys_are_the_documented_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = scores_for(0.9)
    planted[0] += 0.1
    records = [*seeds_of(AUROCS), make_record(repeat=1, scores=planted), make_record(seed=7, status="failed")]
    records += seeds_of(AUROCS, env=GPU_ENV) + seeds_of(AUROCS, sweep="b", model="ganomaly")
    records += seeds_of(AUROCS[:2], sweep="c", seeds_plan=PLAN)
    trial = make_record(model="ganomaly", sweep="b", role="trial", study="hpo")
    trial.update(metrics={"val_image_AUROC": 0.6}, predictions=None, validation=VALIDATION)
    best = seeds_of(AUROCS[:1], model="ganomaly", sweep="b", role="best", selection={"metric": "val_image_AUROC"})
    write_records(tmp_path, [*records, trial, *best])
    _, doc = check_json(tmp_path, capsys=capsys)
    assert set(doc) == JSON_KEYS
    assert {k for g in doc["groups"] for k in g} == GROUP_KEYS
    json_section = (Path(__file__).parent.parent / "docs" / "check-json.md").read_text()
    for key in JSON_KEYS | GROUP_KEYS:
        assert f"`{key}`" in json_section, key
    everything = nested_keys(doc)
    assert {"differing", "cross_environment", "comparisons", "selections", "p_a_better", "env_diff"} <= everything
    assert {"kendall_tau", "ranking_identical", "search_winners", "halfwidth", "outcome"} <= everything
    for key in everything:
        assert re.search(rf"\b{key}\b", json_section), key


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no run records in"),
    ],
)
def test_no_store_or_an_empty_one_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str
) -> None:
    make(tmp_path / "results")
    assert main(["check", str(tmp_path / "results")]) == 2
    assert main(["report", str(tmp_path / "results"), "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert all(message in line for line in err)
    assert not (tmp_path / "r.md").exists()


def test_a_negative_tolerance_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, seeds_of(AUROCS))
    assert main(["check", str(tmp_path), "--tolerance", "-1"]) == 2
    assert "--tolerance must be a finite number >= 0" in capsys.readouterr().err


def test_check_and_report_never_import_torch_anomalib_ray_or_wandb(tmp_path: Path) -> None:
    write_records(tmp_path / "results", seeds_of(AUROCS) + seeds_of(AUROCS, repeat=1))
    code = (
        "import sys; from harness.cli import main; "
        f"assert main(['check', {str(tmp_path / 'results')!r}]) == 0; "
        f"assert main(['report', {str(tmp_path / 'results')!r}, '--out', {str(tmp_path / 'r.md')!r}]) == 0; "
        "heavy = [m for m in ('torch', 'anomalib', 'ray', 'wandb', 'lightning') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_a_run_that_failed_before_hashing_its_data_stays_in_its_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unstarted = make_record(seed=3, status="failed")
    del unstarted["params"]["data"]["sha256"]  # as `unstarted_record` writes it: no data was read
    write_records(tmp_path, [*seeds_of(AUROCS[:3]), unstarted])
    _, doc = check_json(tmp_path, capsys=capsys)
    group = only_group(doc)
    assert (group["label"], len(group["failed"]), group["data_sha256"]) == ("s1/patchcore", 1, ["d0"])


def test_changed_images_are_flagged_and_not_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    changed = make_record(seed=4)
    changed["params"]["data"]["sha256"] = "d1"
    changed["run_id"] = "changed0000000000"
    write_records(tmp_path, [*seeds_of(AUROCS[:4]), changed, *seeds_of(AUROCS, sweep="b", model="ganomaly")])
    _, doc = check_json(tmp_path, capsys=capsys)
    group = only_group(doc, model="patchcore")
    assert group["data_sha256"] == ["d0", "d1"]
    assert group["note"] == "the images changed during the study: 2 versions (data.sha256)"
    assert doc["comparisons"] == []


def test_a_repeat_that_lost_a_metric_is_not_within_tolerance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lost = make_record(repeat=1, metrics={"pixel_AUROC": None, "pixel_AUPRO": None}, scores=scores_for(0.5))
    write_records(tmp_path, [make_record(), lost])
    code, doc = check_json(tmp_path, "--strict", capsys=capsys)
    assert (code, only_group(doc)["determinism"]["verdict"]) == (1, "diverged")


def test_a_failed_repeat_is_said_in_the_determinism_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, [*seeds_of(AUROCS[:3]), make_record(seed=0, repeat=1, status="failed")])
    main(["check", str(tmp_path)])
    assert "untested (no repeats; 1 repeat failed)" in capsys.readouterr().out


def test_opposite_environment_deltas_do_not_cancel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpu = seeds_of([0.85, 0.80, 0.90], env=GPU_ENV)
    write_records(tmp_path, seeds_of([0.80, 0.85, 0.90]) + gpu)
    _, doc = check_json(tmp_path, capsys=capsys)
    (cross,) = only_group(doc)["cross_environment"]
    assert cross["deltas"]["image_AUROC"] == {"mean": pytest.approx(0.0), "max_abs": pytest.approx(0.05)}
    std = statistics.stdev([0.825, 0.825, 0.90])
    assert cross["delta_over_seed_std"] == pytest.approx((0.05 + 0.05 + 0.0) / 3 / std)


def test_many_configurations_are_compared_with_the_best(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = []
    for k in range(10):  # ten sweeps of one config each: more than ALL_PAIRS_UP_TO groups
        records += seeds_of([v - 0.01 * k for v in AUROCS], sweep=f"s{k}", model="ganomaly")
    write_records(tmp_path, records)
    _, doc = check_json(tmp_path, capsys=capsys)
    assert len(doc["comparisons"]) == 9
    assert {c["a"] for c in doc["comparisons"]} == {"s0/ganomaly"}  # the best mean
    verdicts = {c["b"]: c["verdict"] for c in doc["comparisons"]}
    assert verdicts["s1/ganomaly"] == "within noise"
    assert verdicts["s9/ganomaly"] == "A better"


def test_unequal_seed_counts_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, seeds_of(AUROCS, sweep="a") + seeds_of([0.5, 0.55, 0.6], sweep="b", model="ganomaly"))
    _, doc = check_json(tmp_path, capsys=capsys)
    (cmp,) = doc["comparisons"]
    assert (cmp["n_a"], cmp["n_b"], cmp["p_a_better"], cmp["verdict"]) == (5, 3, 1.0, "A better")


def test_a_store_of_malformed_records_only_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "s1" / "runs").mkdir(parents=True)
    (tmp_path / "s1" / "runs" / "x.json").write_text("[]")
    assert main(["check", str(tmp_path)]) == 2
    assert "no readable run record in" in capsys.readouterr().err


def test_a_store_of_trials_only_checks_with_no_test_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trial = make_record(model="ganomaly", role="trial", study="hpo")
    trial.update(metrics={"val_image_AUROC": 0.6}, predictions=None, validation=VALIDATION)
    write_records(tmp_path, [trial])
    assert main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no test runs (only search trials)" in out
    assert "search s1/ganomaly disc: 1 trials (1 ok, 0 failed, 0 stopped early)" in out


def test_a_selection_without_a_value_and_a_best_config_that_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chosen = {"metric": "val_image_AUROC", "mode": "max", "config": {"model_args.lr": 0.001}}
    other = json.loads(json.dumps(make_record(model="ganomaly")["params"]))
    other["model_args"]["lr"] = 0.005
    best = {"model": "ganomaly", "sweep": "hpo", "role": "best", "study": "hpo"}
    records = [make_record(seed=s, metrics={"image_AUROC": 0.9}, selection=chosen, **best) for s in range(2)]
    records.append(make_record(params=other, status="failed", selection={**chosen, "value": 0.4}, **best))
    write_records(tmp_path, records)
    code, doc = check_json(tmp_path, capsys=capsys)
    assert code == 0
    (search,) = doc["searches"]
    by_group = {sel["group"]: sel for sel in search["selections"]}
    assert len(by_group) == 2
    assert {sel["val_score"] for sel in by_group.values()} == {None, 0.4}
    main(["check", str(tmp_path)])
    assert "best val_image_AUROC - -> test image_AUROC 0.900" in capsys.readouterr().out


def test_large_stores_are_read_in_worker_processes_with_the_same_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import harness.check as checker
    import harness.check.index

    write_records(tmp_path, seeds_of(AUROCS) + seeds_of(AUROCS, repeat=1) + seeds_of(AUROCS, category="weave"))
    (tmp_path / "s1" / "runs" / "zzzz.json").write_text("{")
    serial = checker.check(tmp_path).to_json()
    shutil.rmtree(tmp_path / "s1" / "index")  # every file read again, now in workers
    monkeypatch.setattr(harness.check.index, "PARALLEL_MIN_FILES", 2)
    assert checker.check(tmp_path).to_json() == serial
    assert serial["records"]["malformed"] == 1


# --- records whose numbers are verified ---------------------------------------------------


def test_image_metrics_from_scores_are_scikit_learns() -> None:
    """The checker's own AUROC and F1-max, against an independent computation, ties included."""
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    from harness.check.verify import image_metrics

    rng = np.random.default_rng(0)
    for n in (8, 41, 167):
        labels = (rng.random(n) < 0.6).astype(int)
        labels[:2] = [0, 1]
        scores = np.round(rng.random((5, n)) + 0.3 * labels, 2)  # rounded: many ties
        got = image_metrics(labels, scores)
        for row, s in enumerate(scores):
            precision, recall, _ = precision_recall_curve(labels, s)
            f1 = np.nanmax(2 * precision * recall / np.where(precision + recall == 0, np.nan, precision + recall))
            assert got["image_AUROC"][row] == pytest.approx(roc_auc_score(labels, s), abs=1e-12)
            assert got["image_F1Max"][row] == pytest.approx(f1, abs=1e-12)


def _tamper(record: dict[str, Any], how: str) -> None:
    pred = record["predictions"]
    if how == "score":  # one score changed, its hash and metrics left alone
        pred["image_scores"][0] += 10.0
    elif how == "metric":
        record["metrics"]["image_AUROC"] = 0.99
    else:
        pred["scores_sha256"] = "0" * 64


@pytest.mark.parametrize(
    ("how", "why"),
    [
        ("score", "scores_sha256 is not the hash of its image_scores"),
        ("metric", "image_AUROC 0.99 stored, 0.84 from its scores and labels"),
        ("hash", "scores_sha256 is not the hash of its image_scores"),
    ],
)
def test_a_tampered_record_is_corrupt_named_and_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, why: str
) -> None:
    records = seeds_of(AUROCS)
    _tamper(records[2], how)
    write_records(tmp_path, records)
    code, doc = check_json(tmp_path, capsys=capsys)
    path = f"s1/runs/{records[2]['run_id']}.json"
    assert code == 0
    assert doc["corrupt"] == [{"path": path, "error": why}]
    assert doc["records"]["corrupt"] == 1
    assert doc["records"]["ok"] == 4
    stat = only_group(doc)["metrics"]["image_AUROC"]
    assert (stat["n"], stat["mean"]) == (4, pytest.approx(statistics.mean(AUROCS[:2] + AUROCS[3:])))
    assert main(["check", str(tmp_path), "--strict"]) == 1  # --strict: a record is not what it says
    err = capsys.readouterr().err
    assert f"harness check: corrupt record {tmp_path / path}: {why} (left out)" in err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 0
    report = (tmp_path / "r.md").read_text()
    assert "(1 corrupt, left out: see the end)" in report
    assert f"- `{path}`: {why}" in report.split("## Corrupt records")[1]


def test_records_the_harness_writes_verify(tmp_path: Path) -> None:
    """Hand-built records verify, and a store of only corrupt records is a one-line error."""
    from harness.check.verify import verify
    from tests.recordkit import typed

    records = seeds_of(AUROCS)
    assert verify([typed(r) for r in records]) == {}
    for r in records:
        _tamper(r, "metric")
    write_records(tmp_path, records)
    assert main(["check", str(tmp_path)]) == 2


NATIVE = {**rk.ENV, "variant": "native", "environment_id": "env-native"}
FAST = {**rk.ENV, "variant": "fast", "environment_id": "env-fast", "requested": {"aten_cpu_capability": "default"}}
FAST["torch_build"] = {**rk.ENV["torch_build"], "cpu_capability": "default"}


def test_conclusions_are_checked_in_each_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PatchCore beats GANomaly in one environment and not in the other: the table says so."""
    patchcore = [0.90, 0.91, 0.92, 0.93, 0.94]
    records = seeds_of(patchcore, env=NATIVE) + seeds_of(patchcore, env=FAST)
    records += seeds_of([0.60, 0.61, 0.62, 0.63, 0.64], env=NATIVE, model="ganomaly", sweep="g")
    records += seeds_of([0.89, 0.905, 0.92, 0.935, 0.95], env=FAST, model="ganomaly", sweep="g")
    write_records(tmp_path, records)
    _, doc = check_json(tmp_path, capsys=capsys)
    across = doc["across_environments"]
    assert [e["variant"] for e in across["environments"]] == ["fast", "native"]
    verdicts = {c["environment"]: c["verdict"] for c in doc["comparisons"]}
    assert verdicts == {"env-native": "B better", "env-fast": "within noise"}  # A: g/ganomaly, B: s1/patchcore
    pc = only_group(doc, model="patchcore")
    assert set(pc["metrics_by_environment"]) == {"env-native", "env-fast"}
    (cross,) = pc["cross_environment"]
    assert cross["verdict"] == "bitwise"
    assert cross["fingerprint_diff"] == {
        "requested.aten_cpu_capability": ["default", None],
        "torch_build.cpu_capability": ["default", "avx2"],
    }
    gan = only_group(doc, model="ganomaly")
    (moved,) = gan["cross_environment"]
    assert moved["verdict"] == "differs"
    assert moved["scores"]["ranking_identical"] is False
    assert 0 < moved["scores"]["kendall_tau"] < 1
    main(["check", str(tmp_path)])
    text = capsys.readouterr().out
    assert "model comparison per environment, P(A>B) and verdict:" in text
    (row,) = [ln for ln in text.splitlines() if "B better" in ln and "within noise" in ln]
    assert row.rstrip().endswith("NO")


def test_scores_that_keep_their_order_rank_identically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores = scores_for(0.9)
    shifted = [s * (1 + 1e-6) for s in scores]  # every score moves, no image changes place
    write_records(tmp_path, [make_record(scores=scores, env=NATIVE), make_record(scores=shifted, env=FAST)])
    _, doc = check_json(tmp_path, capsys=capsys)
    (cross,) = only_group(doc)["cross_environment"]
    assert cross["verdict"] == "within_tolerance"
    assert cross["scores"]["ranking_identical"] is True
    assert cross["scores"]["kendall_tau"] == 1.0
    assert cross["scores"]["max_rel"] == pytest.approx(1e-6, rel=1e-3)
    assert cross["scores"]["max_abs"] == pytest.approx(max(scores) * 1e-6, rel=1e-3)


def test_records_from_before_environments_are_read_by_their_hardware_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_env = {k: v for k, v in rk.ENV.items() if k not in ("environment_id", "machine_id")} | {"hardware_id": "hw-1"}
    write_records(
        tmp_path,
        [make_record(seed=s, repeat=r, env={**old_env, "environment_id": "x"}) for s in (0, 1) for r in (0, 1)],
    )
    for path in tmp_path.glob("*/runs/*.json"):
        doc = json.loads(path.read_text())
        del doc["environment"]["environment_id"]
        path.write_text(json.dumps(doc))
    _, doc = check_json(tmp_path, capsys=capsys)
    group = only_group(doc)
    assert group["environment_ids"] == ["hw-1"]
    assert group["determinism"]["verdict"] == "bitwise"
