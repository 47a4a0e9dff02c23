"""`harness demo` exactly as the README says to run it: every stage, every run accounted for."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from harness.cli import build_parser
from harness.demo import spec_paths
from harness.spec import load_spec
from tests.test_analysis import run_notebook
from tests.wandbkit import offline_runs

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("weave", "disc", "grid")


def demo_args() -> list[str]:
    """The README's demo command: `make demo`, whose recipe is `$(VENV)/bin/harness ARGS`."""
    readme = (REPO / "README.md").read_text()
    two_commands = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^make demo\b", two_commands, re.M), "the README's first command is no longer `make demo`"
    recipe = re.search(r"^demo:.*\n\t\$\(VENV\)/bin/harness (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert recipe, "the Makefile's demo recipe is no longer `$(VENV)/bin/harness ...`"
    return shlex.split(recipe.group(1))


def test_demo_specs_are_valid_and_ship_in_the_package(tmp_path: Path) -> None:
    """The studies load as `harness sweep` loads them, and a built wheel carries them (the image
    installs the package without `experiments/`)."""
    patchcore, ganomaly, environments, sources_pc, sources_gan = (load_spec(p) for p in spec_paths())
    assert (patchcore.study, patchcore.model, patchcore.seeds) == ("seeds", "patchcore", [0, 1, 2])
    assert patchcore.repeats == 2
    assert (ganomaly.study, ganomaly.model, ganomaly.seeds, ganomaly.repeats) == ("hpo", "ganomaly", [0, 1, 2], 2)
    assert environments.model_args == patchcore.model_args  # the seed study, in other environments
    assert list(environments.environments or {}) == ["native", "aten-default", "bf16"]
    assert tuple(environments.data.categories) == ("grid",)
    assert tuple(patchcore.data.categories) == tuple(ganomaly.data.categories) == CATEGORIES
    for spec in (patchcore, ganomaly, environments):
        assert spec.tracking.wandb is not None
        assert spec.tracking.wandb.mode == "offline"
        assert spec.resources.gpu == 0  # runs anywhere
    assert patchcore.model_args["pre_trained"] is False  # no weights to fetch
    assert sources_pc.model_args == patchcore.model_args  # the seed study's spread, by source
    assert (sources_pc.sources, sources_pc.streams) == (["sampling", "init"], {"order": 0})
    assert (sources_gan.model, sources_gan.study, sources_gan.sources) == ("ganomaly", "seeds", ["init", "order"])
    assert ganomaly.validation.split == "synthetic"  # selection never sees the test split
    src = tmp_path / "src"  # a copy: a build leaves build/ and *.egg-info behind
    shutil.copytree(
        REPO, src, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "demo", "results", "datasets")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, src],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("harness/demo_specs/")) == [
        "harness/demo_specs/environments.yaml",
        "harness/demo_specs/ganomaly.yaml",
        "harness/demo_specs/patchcore.yaml",
        "harness/demo_specs/sources-ganomaly.yaml",
        "harness/demo_specs/sources-patchcore.yaml",
    ]


@pytest.mark.slow
def test_the_readme_demo_runs_the_whole_pipeline(
    tmp_path: Path, ray_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From an empty directory, as a newcomer: data, the studies on Ray, check, report, W&B."""
    args = demo_args()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # the specs' own mode, as on a fresh machine
    harness_bin = Path(sys.executable).with_name("harness")

    def run_demo() -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(harness_bin), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    proc = run_demo()
    out = tmp_path / build_parser().parse_args(args).out
    results = out / "results"

    records = {p.stem: json.loads(p.read_text()) for p in results.glob("*/runs/*.json")}
    assert all(r["status"] == "ok" for r in records.values())
    kinds = Counter((r["sweep"], r["role"], r["category"]) for r in records.values())
    for category in CATEGORIES:  # 3 seeds x 2 repeats; 4 trials, then the best config 3 x 2
        assert kinds[("demo-patchcore", "run", category)] == 6
        assert kinds[("demo-ganomaly", "trial", category)] == 4
        assert kinds[("demo-ganomaly", "best", category)] == 6
    envs = Counter(r["environment"]["variant"] for r in records.values() if r["sweep"] == "demo-environments")
    assert envs == {"native": 3, "aten-default": 3, "bf16": 3}  # grid, 3 seeds, in each
    sources = Counter((r["sweep"], r["category"]) for r in records.values() if "sources" in r["sweep"])
    # 6 seeds, as written and once per source
    assert sources == {("demo-sources-patchcore", c): 18 for c in ("grid", "weave")} | {
        ("demo-sources-ganomaly", "grid"): 18
    }
    assert len(records) == 57 + 36 + 18
    trials = {i for i, r in records.items() if r["role"] == "trial"}
    for r in records.values():
        if r["role"] == "trial":  # scored on the validation split only
            assert r["predictions"] is None
            assert r["validation"]["split"] == "synthetic"
        if r["role"] == "best":
            assert r["selection"]["trial_run_id"] in trials

    # the check's JSON: every record, every group, the same bytes as `harness check --json`
    check_json = (out / "check.json").read_text()
    by_hand = subprocess.run(
        [str(harness_bin), "check", str(results.relative_to(tmp_path)), "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert check_json == by_hand.stdout
    doc = json.loads(check_json)
    assert doc["records"] == {"files": 111, "ok": 99, "failed": 0, "trials": 12, "malformed": 0, "corrupt": 0}
    groups = {(g["sweep"], g["category"]): g for g in doc["groups"] if "sources" not in g["sweep"]}
    envs_group = groups.pop(("demo-environments", "grid"))
    _check_sources(doc, records)
    assert set(groups) == {(s, c) for s in ("demo-patchcore", "demo-ganomaly") for c in CATEGORIES}
    # Three environments, three pairs; the ISA and bf16 each move the scores (measured here)
    cross = {(c["variant_a"], c["variant_b"]): c for c in envs_group["cross_environment"]}
    assert set(cross) == {("aten-default", "bf16"), ("aten-default", "native"), ("bf16", "native")}
    assert all(c["scores"]["max_abs"] > 0 for c in cross.values())
    assert cross[("bf16", "native")]["scores"]["max_abs"] > cross[("aten-default", "native")]["scores"]["max_abs"]
    for g in groups.values():
        assert (g["n_runs"], g["seeds"], g["repeats"]) == (6, [0, 1, 2], 2)
        assert g["determinism"]["verdict"] == "bitwise"  # same seed, same machine
    main = [c for c in doc["comparisons"] if "demo-environments" not in c["a"] + c["b"]]
    assert sorted(c["category"] for c in main) == sorted(CATEGORIES)
    # the environments study's rows are compared with the others only in their environment
    in_envs = [c for c in doc["comparisons"] if c not in main]
    assert in_envs
    assert all("demo-environments/patchcore in native" in (c["a"], c["b"]) for c in in_envs)
    assert len(doc["searches"]) == 3

    # the report, under --out like everything else, and the committed one is that report (same
    # sections and rows; numbers may move)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name], "the demo wrote outside --out"
    reports = out / "reports"
    report = (reports / "demo.md").read_text()
    assert "from 111 records" in report
    assert "## Across environments" in report
    assert "## Variance by source" in report
    plots = re.findall(r"!\[[^]]*\]\((demo/[^)]+\.png)\)", report)
    assert plots
    assert all((reports / p).stat().st_size > 1000 for p in plots)
    assert sorted(p.name for p in (reports / "demo").iterdir()) == sorted(Path(p).name for p in plots)
    committed = (REPO / "reports" / "demo.md").read_text()
    assert _skeleton(committed) == _skeleton(report)
    assert sorted(p.name for p in (REPO / "reports" / "demo").iterdir()) == sorted(Path(p).name for p in plots)

    # W&B: one offline run per stored record, plus each sweep's summary run
    for sweep in ("demo-patchcore", "demo-ganomaly"):
        runs = offline_runs(results / sweep / "wandb")
        mine = {i: r for i, r in records.items() if r["sweep"] == sweep}
        summary = [i for i, rs in runs.items() if rs[0].job_type == "summary"]
        assert len(summary) == 1
        assert set(runs) - set(summary) == set(mine)
        for run_id, record in mine.items():
            (run,) = runs[run_id]
            assert run.group == sweep
            assert run.project == "ad-harness-demo"
            for metric, value in record["metrics"].items():
                if value is not None:
                    assert run.summary[metric] == pytest.approx(value)

    # what it says along the way and at the end
    stdout = proc.stdout
    stages = [int(n) for n in re.findall(r"^== (\d)/8 ", stdout, re.M)]
    assert stages == [1, 2, 3, 4, 5, 6, 7, 8]
    assert stdout.count("by hand: harness ") == 8
    assert re.search(r"^\[18/18 done, 0 failed", stdout, re.M)  # live progress, run by run
    first = re.search(r"^\[1/18 done[^]]*\]", stdout, re.M)
    assert first
    assert "eta" not in first.group(), "an ETA before it can mean anything"
    assert re.search(r"^\[\d+/18 done, 0 failed, 0 already stored, eta \d+m\d\ds\]", stdout, re.M)
    # the seconds with nothing to show are said: the cluster starting, workers importing
    assert "starting a local Ray cluster (this machine only, on loopback; stopped at the end)" in stdout
    assert re.search(r"^\[0/18 done, 0 failed, 0 already stored\] worker \d+ on node \w+ is importing", stdout, re.M)
    assert "Ray Tune is starting its trials" in stdout
    assert re.search(rf"^== done in \d+m\d\ds: report {out.name}/reports/demo\.md$", stdout, re.M)
    for g in groups.values():  # the headline table
        assert re.search(rf"^{g['category']} +{re.escape(g['label'])} +3 ", stdout, re.M)
    assert "experiments/patchcore_seeds.yaml --set data.root=datasets/MVTecAD" in stdout
    assert "ray job submit" in stdout

    # the analysis notebook, headless, on this store (it checks its table against the checker)
    run_notebook(results, monkeypatch)

    # again: it resumes, running, storing and logging nothing new
    files = {p: p.stat().st_mtime_ns for p in results.glob("*/runs/*.json")}
    again = run_demo().stdout
    assert "sweep demo-patchcore: 0 ok, 0 failed, 0 lost, 18 already stored" in again
    assert "sweep demo-ganomaly: 0 ok, 0 failed, 0 lost, " in again
    assert "sweep demo-environments: 0 ok, 0 failed, 0 lost, 9 already stored" in again
    assert "sweep demo-sources-patchcore: 0 ok, 0 failed, 0 lost, 36 already stored" in again
    assert {p: p.stat().st_mtime_ns for p in results.glob("*/runs/*.json")} == files
    assert (out / "check.json").read_text() == check_json
    for sweep in ("demo-patchcore", "demo-ganomaly"):  # no record logged twice; the summary anew
        runs = offline_runs(results / sweep / "wandb")
        assert all(len(rs) == 1 for i, rs in runs.items() if rs[0].job_type != "summary")


def _check_sources(doc: dict[str, Any], records: dict[str, dict[str, Any]]) -> None:
    """The variance-by-source studies: a share per source with its interval, their groups
    labelled and kept out of comparisons, and a run's numbers set by its streams' seeds."""
    shares = {(s["sweep"], s["category"], s["source"]): s for s in doc["sources"] if s["metric"] == "image_AUROC"}
    patchcore = {("demo-sources-patchcore", c, s) for c in ("grid", "weave") for s in ("sampling", "init")}
    assert set(shares) == patchcore | {("demo-sources-ganomaly", "grid", s) for s in ("init", "order")}
    for s in shares.values():
        assert s["n"] == s["n_reference"] == 6
        assert 0 < s["share_low"] < s["share"] < s["share_high"]
    labels = {g["label"] for g in doc["groups"] if g["sweep"] == "demo-sources-patchcore"}
    assert labels == {
        f"demo-sources-patchcore/patchcore [{t}]" for t in ("order=0 pinned", "sampling only", "init only")
    }
    assert not [c for c in doc["comparisons"] if "sources" in c["a"] + c["b"]]
    # seed 0 of each PatchCore source study draws every stream from 0, as the reference's seed 0
    first = [r for r in records.values() if r["sweep"] == "demo-sources-patchcore" and r["seed"] == 0]
    assert len(first) == 6
    assert all(r["streams"] == {"init": 0, "order": 0, "sampling": 0} for r in first)
    for category in ("grid", "weave"):
        assert len({r["predictions"]["scores_sha256"] for r in first if r["category"] == category}) == 1
    assert (
        len({r["predictions"]["scores_sha256"] for r in records.values() if r["sweep"] == "demo-sources-patchcore"})
        > 20
    )


def _skeleton(report: str) -> list[str]:
    """Headings; what was run (without times); the stability table's label, category and seeds."""

    def rows(section: str, columns: int) -> list[str]:
        blocks = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0].split("\n\n")
        table = next(b for b in blocks if b.startswith("| "))  # the section's first table
        return [" | ".join(ln.split(" | ")[:columns]) for ln in table.splitlines() if "---" not in ln]

    headings = [ln for ln in report.splitlines() if ln.startswith(("# Stability", "## "))]
    return headings + rows("What was run", 7) + rows("Stability over seeds", 3)
