"""A sweep among other clusters and other sweeps on one machine: it starts its own cluster
whatever Ray's files say, shares a store with a concurrent sweep without computing a run
twice, and keeps Ray's paragraphs about dead workers off its output."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.store import ResultsStore
from tests.test_sweep import SMOKE, _free_port, head_node, records, sweep_cli, write_spec

__all__ = ["head_node"]  # a fixture, used by name below


def _spec(tmp_path: Path, synth_root: Path, **changes: object) -> Path:
    """The smoke study on one category: 2 seeds x 2 repeats = 4 runs."""
    return write_spec(tmp_path / "s.yaml", SMOKE, data__root=str(synth_root), data__categories=["disc"], **changes)


@pytest.mark.slow
def test_a_stale_current_cluster_file_is_not_joined(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    """A `ray start --head` that ended left its address in Ray's current-cluster file."""
    stale = ray_tmp / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True)
    stale.write_text(f"127.0.0.1:{_free_port()}")
    start = time.monotonic()
    out = sweep_cli(_spec(tmp_path, synth_root, seeds=[0], repeats=1), tmp_path / "results")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "starting a local Ray cluster" in out.stdout
    assert "sweep smoke: 1 ok" in out.stdout
    assert time.monotonic() - start < 120


@pytest.mark.slow
def test_a_cluster_running_on_the_machine_is_not_joined(head_node: str, tmp_path: Path, synth_root: Path) -> None:
    """Someone's `ray start --head` (no CPUs for runs here) is theirs: the sweep starts its own."""
    from ray.job_submission import JobSubmissionClient

    out = sweep_cli(_spec(tmp_path, synth_root, seeds=[0], repeats=1), tmp_path / "results")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sweep smoke: 1 ok" in out.stdout
    assert JobSubmissionClient(head_node).list_jobs() == []  # no driver ever joined it


def test_an_address_in_the_environment_that_nothing_answers_on_is_one_line(tmp_path: Path, synth_root: Path) -> None:
    out = sweep_cli(_spec(tmp_path, synth_root), tmp_path / "r", env={"RAY_ADDRESS": f"127.0.0.1:{_free_port()}"})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "RAY_ADDRESS 127.0.0.1:" in out.stderr
    assert "no Ray cluster answers there" in out.stderr


@pytest.mark.slow
def test_two_sweeps_into_one_store_compute_each_run_once(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    spec = _spec(tmp_path, synth_root)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness", "sweep", str(spec), "--results", str(results)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    computed = sum(out.count("] ok patchcore disc") for out, _ in outs)
    assert computed == 4, [out for out, _ in outs]  # each run once, by one sweep or the other
    assert sorted((r["seed"], r["repeat"]) for r in records(results)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not list((results / "smoke" / "claims").iterdir())


@pytest.mark.slow
def test_a_killed_worker_is_one_progress_line_and_a_log_entry(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    spec = _spec(tmp_path, synth_root)
    results = tmp_path / "results"
    driver = subprocess.Popen(
        [sys.executable, "-m", "harness", "sweep", str(spec), "--results", str(results)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and driver.poll() is None:
        if list(ResultsStore(results).paths()):  # a run is done: the next ones are under way
            for proc in psutil.Process(driver.pid).children(recursive=True):
                if "ray::execute" in " ".join(proc.cmdline()) and proc.cpu_percent(0.2) > 0:
                    proc.send_signal(signal.SIGKILL)
                    killed = proc.pid
                    break
        time.sleep(0.2)
    out, err = driver.communicate(timeout=600)
    assert killed is not None, "no busy worker was found to kill"
    assert driver.returncode == 0, err[-2000:]
    assert "retrying patchcore disc" in out
    assert "sweep smoke: 4 ok, 0 failed, 0 lost" in out
    assert "(raylet)" not in out + err
    assert "worker" in (results / "smoke" / "ray.log").read_text().lower()


def test_pretrained_weights_it_cannot_get_fail_before_any_run(tmp_path: Path, synth_root: Path) -> None:
    spec = _spec(tmp_path, synth_root, model_args__pre_trained=True)
    out = sweep_cli(spec, tmp_path / "results", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "pretrained resnet18 weights unavailable" in out.stderr
    assert "starting a local Ray cluster" not in out.stdout
    assert not (tmp_path / "results" / "smoke").exists()


@pytest.mark.slow
def test_the_same_study_in_another_environment_is_other_runs(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    """Resume leaves out what is stored in the environment the runs get now, not elsewhere."""
    spec = _spec(tmp_path, synth_root, seeds=[0], repeats=1)
    results = tmp_path / "results"
    assert sweep_cli(spec, results).returncode == 0
    other = sweep_cli(spec, results, env={"ATEN_CPU_CAPABILITY": "default"})  # workers inherit it
    assert other.returncode == 0, other.stderr[-2000:]
    assert "sweep smoke: 1 ok, 0 failed, 0 lost, 0 already stored" in other.stdout
    again = sweep_cli(spec, results, env={"ATEN_CPU_CAPABILITY": "default"})
    assert "sweep smoke: 0 ok, 0 failed, 0 lost, 1 already stored" in again.stdout
    assert "importing anomalib" not in again.stdout
    assert len({r["environment"]["environment_id"] for r in records(results)}) == 2
