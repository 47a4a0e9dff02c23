"""A real multi-host Ray cluster (tests/netns.py: one network namespace per host) with Ray's
token auth on: a study submitted from the client host with `ray job submit` runs on the
worker hosts, clients without the token are refused, and nothing is left after teardown."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from harness.spec import expand, validate_spec
from harness.store import ResultsStore
from tests.netns import BIN, NetnsCluster, unavailable

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
# A driver from the client host: it joins, sees the nodes and runs a task (on a worker: the
# head has no CPU). Refused ones give up after one try (Ray's default is 20, a second apart).
DRIVER = (
    "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
    "print('alive', sum(n['Alive'] for n in ray.nodes()), 'task', ray.get(ray.remote(lambda: 6 * 7).remote()))"
)
ONE_TRY = {"RAY_gcs_server_port_wait_time_s": "1"}

pytestmark = pytest.mark.slow


def need_netns() -> None:
    why = unavailable()
    if why is not None:
        pytest.skip(why)


@pytest.fixture(scope="module")
def cluster() -> Iterator[NetnsCluster]:
    """Head, two one-CPU workers and a client, each its own namespace; shared by this module's
    tests (none of them changes it for the next); nothing of it may outlive the module."""
    need_netns()
    c = NetnsCluster(workers=2)
    with c:
        yield c
    assert c.leftovers() == []


def test_three_ray_nodes_on_three_hosts(cluster: NetnsCluster) -> None:
    alive = cluster.alive()
    assert set(alive) == {"head", "w1", "w2"}
    nodes = {n["host"]: n for n in cluster.nodes() if n["state"] == "ALIVE"}
    addresses = {n["node_ip"] for n in nodes.values()}
    assert addresses == {cluster.hosts[h].address for h in ("head", "w1", "w2")}
    assert len(addresses) == 3
    assert nodes["head"]["is_head_node"]
    assert nodes["head"]["resources_total"].get("CPU", 0) == 0
    assert nodes["w1"]["resources_total"]["CPU"] == nodes["w2"]["resources_total"]["CPU"] == 1
    # Each host has its own network: its address only, no route out of the cluster's subnet.
    routes = cluster.exec("w1", ["ip", "-4", "route"], check=True).stdout
    assert "default" not in routes
    assert cluster.pids("client") == []  # nothing runs on the client until a test runs it


def test_a_study_submitted_from_the_client_runs_on_the_workers(
    cluster: NetnsCluster, tmp_path: Path, synth_root: Path
) -> None:
    doc = yaml.safe_load(SMOKE.read_text())
    doc.update(seeds=[0, 1], repeats=1)
    doc["data"].update(root=str(synth_root), categories=["weave", "disc"])
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    results = tmp_path / "results"  # one file system for all hosts: the shared results volume
    job = cluster.submit(
        ["harness", "sweep", str(spec_file), "--address", "auto", "--results", str(results)],
        env={"WANDB_MODE": "disabled"},
    )
    status = cluster.wait(job, timeout=600)
    logs = cluster.logs(job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "sweep smoke: 4 ok, 0 failed, 0 lost, 0 already stored" in logs
    recs = [json.loads(p.read_text()) for p in ResultsStore(results).paths()]
    planned = sorted((r.category, r.seed, r.repeat) for r in expand(validate_spec(doc)))
    assert sorted((r["category"], r["seed"], r["repeat"]) for r in recs) == planned  # each once
    assert all(r["status"] == "ok" for r in recs)
    alive = cluster.alive()
    assert {r["node_id"] for r in recs} == {alive["w1"], alive["w2"]}  # both worker hosts ran some


def test_clients_without_the_token_are_refused(cluster: NetnsCluster, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()  # no ~/.ray/auth_token to fall back on
    without = {
        "wrong token": {"HOME": str(home), "RAY_AUTH_TOKEN": secrets.token_hex(32)},
        "auth off": {"HOME": str(home), "RAY_AUTH_MODE": "disabled"},  # sends no token at all
    }
    driver = [sys.executable, "-c", DRIVER, cluster.gcs_address]
    submit = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--no-wait"]
    ids = {why: f"refused-{secrets.token_hex(4)}" for why in without} | {"token": f"accepted-{secrets.token_hex(4)}"}

    def attempt(kind: str, why: str) -> subprocess.CompletedProcess[str]:
        """A driver or `ray job submit` from the client host, with the token or without it."""
        argv = driver if kind == "driver" else [*submit, "--submission-id", ids[why], "--", "true"]
        if why == "token":
            return cluster.exec("client", argv, timeout=120)
        return cluster.exec("client", argv, token=False, env={**without[why], **ONE_TRY}, timeout=120)

    with ThreadPoolExecutor(max_workers=6) as pool:  # independent clients: at once
        futures = {(k, w): pool.submit(attempt, k, w) for k in ("driver", "submit") for w in [*without, "token"]}
        out = {key: f.result() for key, f in futures.items()}

    # A Python driver: the GCS refuses it; with the token it joins and runs a task on a worker.
    for why in without:
        refused = out["driver", why]
        assert refused.returncode != 0, why
        assert "Authentication token is missing or incorrect" in refused.stderr, (why, refused.stderr[-2000:])
    assert out["driver", "token"].returncode == 0, out["driver", "token"].stderr[-3000:]
    assert "alive 3 task 42" in out["driver", "token"].stdout

    # `ray job submit`: the dashboard refuses it and makes no job; with the token the job runs.
    for why, answer in (("wrong token", "Forbidden"), ("auth off", "Unauthorized")):
        refused = out["submit", why]
        assert refused.returncode != 0, why
        assert answer in refused.stdout + refused.stderr, (why, refused.stderr[-2000:])
        assert cluster.http("GET", f"/api/jobs/{ids[why]}").status == 404
    accepted = out["submit", "token"]
    assert accepted.returncode == 0, accepted.stdout[-2000:] + accepted.stderr[-2000:]
    assert cluster.wait(ids["token"], timeout=120) == "SUCCEEDED"

    # The dashboard's job API: 401 without a token, 403 with a wrong one, for reads and writes.
    for token, code in ((False, 401), (secrets.token_hex(32), 403)):
        assert cluster.http("GET", "/api/jobs/", token=token).status == code
        assert cluster.http("POST", "/api/jobs/", {"entrypoint": "true"}, token=token).status == code
    listed = cluster.http("GET", "/api/jobs/")
    assert listed.status == 200
    assert ids["token"] in {j["submission_id"] for j in listed.json()}


def test_cut_restore_and_kill_host(cluster: NetnsCluster) -> None:
    """The fault-injection primitives, on the client host (the Ray nodes are left alone)."""
    cluster.cut("client")
    try:
        assert cluster.http("GET", "/api/version", timeout=2).status is None  # no way to the head
    finally:
        cluster.restore("client")
    assert cluster.http("GET", "/api/version").status == 200
    sleepers = [cluster.popen("client", ["sleep", "600"]) for _ in range(2)]
    assert {p.pid for p in sleepers} <= set(cluster.pids("client"))
    assert set(cluster.kill_host("client")) >= {p.pid for p in sleepers}
    assert cluster.pids("client") == []
    assert [p.wait(timeout=5) for p in sleepers] == [-9, -9]


def test_teardown_leaves_nothing_when_the_test_fails() -> None:
    """The network and processes of every host are gone after a failure inside the cluster's
    block. (A whole Ray cluster's teardown is checked by the module's fixture, after its tests.)"""
    need_netns()
    c = NetnsCluster(workers=2, ray=False)

    def failing_test() -> None:
        with c:
            for host in c.hosts:
                c.popen(host, ["sh", "-c", "sleep 600 & sleep 600"])  # a child and its parent
            assert c.leftovers()  # namespaces, processes, the cluster's directory
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        failing_test()
    assert c.leftovers() == []
