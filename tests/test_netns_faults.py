"""Faults on a real multi-host Ray cluster (network namespaces, ``tests/netns.py``): a worker
host's link cut (and put back), a host whose every process dies at once, a job driver killed
and the job submitted again. The study is the one the issue measured: PatchCore, 2 categories
x 4 seeds, 8 runs at 64 px, submitted with ``ray job submit`` from a client host."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness.store import ResultsStore
from harness.sweep.cluster import node_failure_env
from tests.conftest import TINY
from tests.netns import NetnsCluster, short_tmp, unavailable
from tests.test_sweep import SMOKE, records, snapshot, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(unavailable()), reason=str(unavailable()))]
RUNS = 8
CUT_TO_DONE_S = 120.0  # the target: the study finishes within 2 minutes of the cut


@pytest.fixture
def cluster() -> Iterator[NetnsCluster]:
    root = short_tmp()
    with NetnsCluster(root, workers=2, env=node_failure_env()) as c:
        yield c
    assert not c.leftovers()


@pytest.fixture
def study(tmp_path: Path, synth_root: Path) -> Path:
    assert TINY["size"] == 64
    return write_spec(
        tmp_path / "study.yaml", SMOKE, data__root=str(synth_root), seeds=[0, 1, 2, 3], repeats=1
    )  # 2 categories x 4 seeds


def submit(cluster: NetnsCluster, spec: Path, results: Path) -> str:
    return cluster.submit(["harness", "sweep", str(spec), "--address", "auto", "--results", str(results)])


def wait_records(results: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(list(ResultsStore(results).paths())) < n:
        assert time.monotonic() < deadline, f"fewer than {n} records after {timeout:.0f} s"
        time.sleep(0.2)


def assert_each_run_once(results: Path) -> list[dict[str, object]]:
    recs = records(results)
    keys = [(r["category"], r["seed"], r["repeat"]) for r in recs]
    assert len(keys) == RUNS, keys
    assert len(set(keys)) == RUNS, keys
    assert all(r["status"] == "ok" for r in recs)
    assert not list((results / "smoke" / "claims").glob("*.json"))
    return recs


def busy_worker(cluster: NetnsCluster, results: Path) -> str:
    """A worker host in the middle of a run: one whose node has stored a record (both do)."""
    done = {r["node_id"] for r in records(results)}
    for host, node in cluster.alive().items():
        if host in cluster.workers and node in done:
            return host
    return cluster.workers[0]


def test_a_cut_link_costs_seconds_not_minutes_and_nothing_twice(
    cluster: NetnsCluster, study: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    job = submit(cluster, study, results)
    wait_records(results, 2)
    host = busy_worker(cluster, results)
    node = cluster.alive()[host]
    cut = time.monotonic()
    cluster.cut(host)
    while node in cluster.alive().values():
        assert time.monotonic() - cut < CUT_TO_DONE_S, "Ray never declared the cut node dead"
        time.sleep(0.5)
    detected = time.monotonic() - cut
    cluster.restore(host)  # the link comes back: the node stays out or rejoins, nothing twice
    status = cluster.wait(job, timeout=CUT_TO_DONE_S)
    finished = time.monotonic() - cut
    logs = cluster.logs(job)
    print(
        f"node declared dead {detected:.1f} s after the cut; study done {finished:.1f} s after it; "
        f"alive at the end: {sorted(cluster.alive())}"
    )
    assert status == "SUCCEEDED", logs[-3000:]
    assert finished < CUT_TO_DONE_S
    assert "retrying patchcore" in logs
    assert "(raylet)" not in logs
    recs = assert_each_run_once(results)
    assert len({r["node_id"] for r in recs}) == 2


def test_a_host_whose_every_process_dies_at_once(cluster: NetnsCluster, study: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    job = submit(cluster, study, results)
    wait_records(results, 2)
    killed = time.monotonic()
    assert cluster.kill_host(busy_worker(cluster, results))
    status = cluster.wait(job, timeout=CUT_TO_DONE_S)
    logs = cluster.logs(job)
    print(f"study done {time.monotonic() - killed:.1f} s after the host died")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "(raylet)" not in logs
    assert_each_run_once(results)


def test_a_killed_driver_resubmitted_resumes_touching_no_finished_record(
    cluster: NetnsCluster, study: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    job = submit(cluster, study, results)
    wait_records(results, 3)
    drivers = [p for pid in cluster.pids("head") if "harness sweep" in " ".join((p := psutil.Process(pid)).cmdline())]
    assert drivers  # the entrypoint's shell and the harness process under it
    for driver in drivers:
        driver.send_signal(signal.SIGKILL)
    assert cluster.wait(job, timeout=60) == "FAILED"
    before = snapshot(results)
    assert 3 <= len(before) < RUNS, "the kill should land mid-sweep"
    again = submit(cluster, study, results)
    status = cluster.wait(again, timeout=300)
    logs = cluster.logs(again)
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"{len(before)} already stored" in logs
    assert_each_run_once(results)
    after = snapshot(results)
    assert {k: after[k] for k in before} == before  # finished records untouched
