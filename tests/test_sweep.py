"""Sweeps on real Ray clusters (local, multi-node on one machine, and through `ray job submit`)
with real anomalib runs on tiny synthetic data."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.run import planned_run_id, run_one
from harness.spec import expand, load_spec, validate_spec
from harness.store import ResultsStore
from tests.conftest import TINY, kill_ray_processes

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
SMOKE_HPO = REPO / "experiments" / "smoke_hpo.yaml"


def sweep_cli(
    spec: Path, results: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``harness sweep`` in a fresh process (``env``: variables on top of this one's)."""
    return subprocess.run(
        [sys.executable, "-m", "harness", "sweep", str(spec), "--results", str(results), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def write_spec(path: Path, base: Path, **changes: Any) -> Path:
    """A copy of a shipped spec with some keys changed (dotted keys, as --set takes them)."""
    doc = yaml.safe_load(base.read_text())
    for key, value in changes.items():
        node = doc
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(doc))
    return path


def records(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in ResultsStore(results).paths()]


def snapshot(results: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in ResultsStore(results).paths()}


@pytest.fixture
def disc_spec(tmp_path: Path, synth_root: Path) -> Path:
    """The smoke spec on one category: 2 seeds x 2 repeats = 4 PatchCore runs."""
    return write_spec(tmp_path / "smoke.yaml", SMOKE, data__root=str(synth_root), data__categories=["disc"])


@pytest.mark.slow
def test_seeds_sweep_stores_every_run_as_harness_run_would(disc_spec: Path, tmp_path: Path, ray_tmp: Path) -> None:
    results = tmp_path / "results"
    out = sweep_cli(disc_spec, results)
    assert out.returncode == 0, out.stderr
    recs = records(results)
    assert sorted((r["seed"], r["repeat"]) for r in recs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["status"] == "ok" and r["role"] == "run" and r["node_id"] for r in recs)
    assert "4/4 done, 0 failed" in out.stdout
    assert "sweep smoke: 4 ok, 0 failed, 0 lost, 0 already stored" in out.stdout
    by_seed = {(r["seed"], r["repeat"]): r["predictions"]["scores_sha256"] for r in recs}
    assert by_seed[(0, 0)] == by_seed[(0, 1)]
    assert by_seed[(0, 0)] != by_seed[(1, 0)]  # the seed moves the coreset (and the random backbone)

    # A sweep's run is `harness run`'s run: same id, bit-identical scores, in a fresh process here.
    spec = load_spec(disc_spec)
    first = expand(spec)[0]
    direct = run_one(first)
    stored = next(r for r in recs if r["run_id"] == direct.run_id)
    assert stored["predictions"]["scores_sha256"] == direct.predictions.scores_sha256  # type: ignore[union-attr]
    assert stored["predictions"]["maps_sha256"] == direct.predictions.maps_sha256  # type: ignore[union-attr]

    # Rerun: everything is stored already, nothing runs again and no file is touched.
    before = snapshot(results)
    again = sweep_cli(disc_spec, results)
    assert again.returncode == 0, again.stderr
    assert "0 ok, 0 failed, 0 lost, 4 already stored" in again.stdout
    assert "importing anomalib" not in again.stdout  # stored runs were never sent to a worker
    assert snapshot(results) == before
    assert not list((results / "smoke" / "claims").iterdir())  # every claim dropped

    # A record whose scores, metric or hash was changed is corrupt: its run goes again.
    paths = sorted(ResultsStore(results).paths())
    for path, how in zip(paths, ("score", "metric", "hash"), strict=False):
        doc = json.loads(path.read_text())
        if how == "score":
            doc["predictions"]["image_scores"][0] += 10.0
        elif how == "metric":
            doc["metrics"]["image_AUROC"] = 0.5
        else:
            doc["predictions"]["scores_sha256"] = "0" * 64
        path.write_text(json.dumps(doc))
    third = sweep_cli(disc_spec, results)
    assert third.returncode == 0, third.stderr
    assert third.stdout.count("is corrupt (") == 3
    assert "3 ok, 0 failed, 0 lost, 1 already stored" in third.stdout
    rerun = {p.name: json.loads(p.read_text()) for p in paths}
    for path in paths:  # the same bits again: the runs are deterministic
        old = json.loads(before[path.name][1])
        assert rerun[path.name]["predictions"]["scores_sha256"] == old["predictions"]["scores_sha256"]
        assert rerun[path.name]["metrics"] == old["metrics"]
    checked = subprocess.run(
        [sys.executable, "-m", "harness", "check", str(results), "--strict"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_runs(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    spec_path = write_spec(tmp_path / "s.yaml", SMOKE, data__root=str(synth_root), seeds=[0, 1, 2])  # 12 runs
    spec = load_spec(spec_path)
    results = tmp_path / "results"
    driver = subprocess.Popen(
        [sys.executable, "-m", "harness", "sweep", str(spec_path), "--results", str(results)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the local cluster with it
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(ResultsStore(results).paths())) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    kill_ray_processes(ray_tmp)
    before = snapshot(results)
    assert 3 <= len(before) < 12, "the kill should land mid-sweep"

    out = sweep_cli(spec_path, results)
    assert out.returncode == 0, out.stderr
    assert f"{len(before)} already stored" in out.stdout
    planned = {f"{planned_run_id(r)}.json" for r in expand(spec)}
    after = snapshot(results)
    assert set(after) == planned  # the uninterrupted sweep's set of runs, no duplicates
    assert {k: after[k] for k in before} == before  # finished runs were not rerun


@pytest.mark.slow
def test_failed_runs_are_stored_named_and_retried(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    spec_path = write_spec(
        tmp_path / "s.yaml",
        SMOKE,
        data__root=str(synth_root),
        data__categories=["disc"],
        seeds=[0],
        model_args__coreset_sampling_ratio=0.0001,  # fewer than one patch: anomalib raises
    )
    results = tmp_path / "results"
    out = sweep_cli(spec_path, results)
    assert out.returncode == 1
    recs = records(results)
    assert len(recs) == 2
    assert all(r["status"] == "failed" and "coreset_size" in r["error"] for r in recs)
    assert "0 ok, 2 failed" in out.stdout
    assert "failed: patchcore disc seed=0 r0: ValueError" in out.stdout
    assert "failed: patchcore disc seed=0 r1: ValueError" in out.stdout
    again = sweep_cli(spec_path, results)  # a failed run is not final: it is run again
    assert "0 ok, 2 failed, 0 lost, 0 already stored" in again.stdout


@pytest.mark.slow
def test_hpo_selects_on_validation_then_runs_the_best_config_per_seed(
    tmp_path: Path, synth_root: Path, ray_tmp: Path
) -> None:
    results = tmp_path / "results"
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "synth").symlink_to(synth_root)
    # The spec's relative data root, as users run it: trials must not lose it (Tune runs them
    # inside their log folders).
    out = sweep_cli(SMOKE_HPO, results, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    recs = records(results)
    trials = [r for r in recs if r["role"] == "trial"]
    best = [r for r in recs if r["role"] == "best"]
    assert len(trials) == 4
    assert sorted(r["seed"] for r in best) == [0, 1]
    for t in trials:  # trials never see the test split
        assert t["predictions"] is None
        assert t["data"]["n_test"] is None
        assert set(t["metrics"]) == {"val_image_AUROC", "val_image_F1Max", "val_pixel_AUROC", "val_pixel_AUPRO"}
        v = t["validation"]
        assert v["split"] == "synthetic"
        assert v["ratio"] == 0.5
        assert v["n_val"] == TINY["n_train"] // 2
        assert 0 < v["n_val_anomalous"] < v["n_val"]
        assert t["data"]["n_train"] == TINY["n_train"] - v["n_val"]
        assert v["stopped_early"] == (len(v["curve"]) < 3)
        assert t["metrics"]["val_image_AUROC"] == v["curve"][-1]["val_image_AUROC"]
    finished = [t for t in trials if not t["validation"]["stopped_early"]]
    winner = max(finished, key=lambda t: (t["metrics"]["val_image_AUROC"], t["run_id"]))  # ties: larger id
    for b in best:
        sel = b["selection"]
        assert sel["trial_run_id"] == winner["run_id"]
        assert sel["value"] == winner["metrics"]["val_image_AUROC"]
        assert sel["validation"] == {"split": "synthetic", "ratio": 0.5}
        assert b["params"]["model_args"]["lr"] == sel["config"]["model_args.lr"]
        assert b["data"]["n_train"] == TINY["n_train"]  # the best config trains on all of train
        assert b["metrics"]["image_AUROC"] is not None
        assert b["validation"] is None
    assert "search disc: 4 trials" in out.stdout

    before = snapshot(results)
    again = sweep_cli(SMOKE_HPO, results, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 ok, 0 failed, 0 lost, 6 already stored" in again.stdout
    assert snapshot(results) == before


@pytest.mark.slow
def test_failed_trials_are_stored_and_the_search_ends_cleanly(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    """Trials that fail before their first validation (no metric to report) fail the sweep in order."""
    spec = write_spec(
        tmp_path / "s.yaml",
        SMOKE_HPO,
        model="patchcore",
        model_args={"pre_trained": False},
        data__root=str(synth_root),
        search_space={"model_args.coreset_sampling_ratio": {"type": "uniform", "low": 0.0001, "high": 0.0002}},
        num_samples=2,
    )
    results = tmp_path / "results"
    out = sweep_cli(spec, results)
    assert out.returncode == 1, out.stderr
    recs = records(results)
    assert len(recs) == 2
    assert all(r["role"] == "trial" and r["status"] == "failed" and "coreset_size" in r["error"] for r in recs)
    assert "failed: disc: no trial finished; nothing to select" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.slow
def test_multinode_spreads_runs_and_survives_a_lost_node(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    from ray.cluster_utils import Cluster

    from harness.sweep import sweep

    spec = validate_spec(
        {
            **yaml.safe_load(SMOKE.read_text()),
            "data": {**yaml.safe_load(SMOKE.read_text())["data"], "root": str(synth_root)},
            "seeds": [0, 1, 2],
        }
    )  # 12 runs, one CPU each
    results = tmp_path / "results"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        doomed = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        removed = threading.Event()

        def remove_when_both_nodes_worked() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if len({r["node_id"] for r in records(results)}) >= 2:
                    cluster.remove_node(doomed, allow_graceful=False)
                    removed.set()
                    return
                time.sleep(0.1)

        killer = threading.Thread(target=remove_when_both_nodes_worked)
        killer.start()
        tally = sweep(spec, results, address=cluster.address)
        killer.join()
    finally:
        cluster.shutdown()
    assert removed.is_set()
    assert tally.clean, (tally.failed, tally.lost)
    recs = records(results)
    keys = [(r["category"], r["seed"], r["repeat"]) for r in recs]
    assert len(keys) == 12
    assert len(set(keys)) == 12  # every run once: a retried run is not stored twice
    assert len({r["node_id"] for r in recs}) == 2
    assert all(r["status"] == "ok" for r in recs)


@pytest.fixture
def head_node(tmp_path: Path, ray_tmp: Path) -> Iterator[str]:
    """A Ray head node on loopback with a dashboard (for `ray job submit`), stopped by its PID."""
    port, dash = _free_port(), _free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("WANDB_MODE", None)  # a job sees W&B settings only through its runtime env
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            f"--temp-dir={ray_tmp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{url}/api/version", timeout=120)
        yield url
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        assert kill_ray_processes(ray_tmp) == 0, "the head left processes behind"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_ray_job_submit_runs_the_smoke_sweep(head_node: str, tmp_path: Path, synth_root: Path) -> None:
    """As the README says to submit it, W&B settings passed through the job's runtime env,
    in two environments (a variant's workers start with its variables and the job's)."""
    results = tmp_path / "results"
    submit = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            head_node,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"env_vars": {"WANDB_MODE": "offline"}}),
            "--",
            "harness",
            "sweep",
            "experiments/smoke.yaml",
            "--address",
            "auto",
            "--set",
            f"data.root={synth_root}",
            "--set",
            "data.categories=[disc]",
            "--set",
            "seeds=[0]",
            "--set",
            "tracking.wandb.mode=disabled",  # the runtime env's WANDB_MODE overrides it
            # A variant's workers get its variables on top of the job's (both must arrive).
            "--set",
            "environments.native={}",
            "--set",
            "environments.aten-default.aten_cpu_capability=default",
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout
    assert "sweep smoke: 4 ok, 0 failed" in submit.stdout
    recs = records(results)
    assert len(recs) == 4
    assert all(r["status"] == "ok" for r in recs)
    dispatch = {r["environment"]["variant"]: r["environment"]["torch_build"]["cpu_capability"] for r in recs}
    assert dispatch["aten-default"] == "default"
    assert dispatch["native"] != "default"
    assert "W&B (offline): 4 runs and the summary run" in submit.stdout
    logged = {p.name.rsplit("-", 1)[-1] for p in (results / "smoke" / "wandb").glob("offline-run-*")}
    assert {r["run_id"] for r in recs} < logged


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, "colour: unknown key"),
        ({"repeats": "two"}, "repeats: Input should be a valid integer"),
        ({"model": "padim"}, "model: unknown model 'padim'"),
        ({"study": "hpo"}, "search_space: study: hpo needs at least one dimension"),
        ({"num_samples": 4}, "num_samples: only for study: hpo"),
    ],
)
def test_bad_specs_fail_in_one_line_before_ray_starts(changes: dict[str, Any], message: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "bad.yaml", SMOKE, **changes)
    t0 = time.monotonic()
    out = sweep_cli(spec, tmp_path / "results")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert message in out.stderr
    assert time.monotonic() - t0 < 20  # no cluster was started for it
    assert not (tmp_path / "results").exists()


def test_missing_data_fails_before_ray_starts(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", SMOKE, data__root=str(tmp_path / "nowhere"))
    out = sweep_cli(spec, tmp_path / "results")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "data root" in out.stderr
    assert "not found" in out.stderr


@pytest.mark.slow
def test_impossible_resources_fail_before_any_run(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", SMOKE, data__root=str(synth_root), resources={"cpu": 64, "gpu": 0})
    out = sweep_cli(spec, tmp_path / "results")
    assert out.returncode == 2
    assert "resources.cpu=64 per run, but no node of this cluster has more than" in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert not list(ResultsStore(tmp_path / "results").paths())


def test_searchers_are_seeded_and_named_ones_need_their_package() -> None:
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from harness.errors import HarnessError
    from harness.sweep.search import max_epochs, searcher

    hpo = load_spec(REPO / "experiments" / "ganomaly_hpo.yaml")
    assert isinstance(searcher(hpo), BasicVariantGenerator)
    assert isinstance(searcher(hpo.model_copy(update={"search": "optuna"})), OptunaSearch)
    try:
        import hyperopt  # noqa: F401
    except ImportError:
        with pytest.raises(HarnessError, match="search: hyperopt needs its package"):
            searcher(hpo.model_copy(update={"search": "hyperopt"}))
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        assert isinstance(searcher(hpo.model_copy(update={"search": "hyperopt"})), HyperOptSearch)
    assert max_epochs(hpo) == 40  # ASHA's last rung: the most epochs a trial can be given


def test_pixel_metrics_need_a_model_with_maps(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", SMOKE_HPO, metric="val_pixel_AUROC")
    out = sweep_cli(spec, tmp_path / "results")
    assert out.returncode == 2
    assert "metric: ganomaly makes no anomaly maps" in out.stderr


def test_a_cluster_inside_an_open_one_is_that_one_or_an_error(ray_tmp: Path) -> None:
    """The demo runs both studies on one local cluster; joining another meanwhile is refused."""
    import ray

    from harness.errors import HarnessError
    from harness.sweep import cluster, held

    with cluster(None):
        context = ray.get_runtime_context().get_node_id()
        with cluster(None):
            assert ray.get_runtime_context().get_node_id() == context  # no second cluster was started
            assert held() == [None]
        assert ray.is_initialized()  # the inner one did not stop the outer one's cluster
        message = "already holds a local Ray cluster; it cannot also join 127.0.0.1:1"
        with pytest.raises(HarnessError, match=re.escape(message)), cluster("127.0.0.1:1"):
            pass
        assert held() == [None]
    assert held() == []
    assert not ray.is_initialized()


def test_an_address_nothing_answers_on_is_one_line(tmp_path: Path, synth_root: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", SMOKE, data__root=str(synth_root))
    out = sweep_cli(spec, tmp_path / "results", "--address", f"127.0.0.1:{_free_port()}")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "no Ray cluster answers there" in out.stderr
