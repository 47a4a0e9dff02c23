"""infra/Dockerfile built for real and run: on a Debian bookworm base (debootstrap: no registry
here) with its python3, the lock's wheels from this machine's wheel cache. A seed study in the
container (uid 1000, data read-only, results writable, as compose and KubeRay mount them) gives
the records the same study gives outside it, and a Ray head and worker from the image make a
two-node cluster that runs a study submitted with `ray job submit`. The engine, its containers,
images and mounts are gone afterwards (tests/dockerkit.py)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.check.load import fingerprint_diff
from harness.synth import synth
from tests.conftest import TINY
from tests.dockerkit import CACHE, Engine, serve, unavailable

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TAG = f"ad-harness-test:{os.getpid()}"
# The smoke study, small: one category, two seeds, one repeat each.
STUDY = ["--set", "data.categories=[disc]", "--set", "seeds=[0,1]", "--set", "repeats=1"]
RUN_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

pytestmark = pytest.mark.slow


def need_engine() -> None:
    why = unavailable()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the image test: {why}")
        pytest.skip(why)


def wheels() -> Path:
    """The lock's wheels, from this machine's pip (its local indexes and cache): what
    `make install` takes too. Kept between runs to save a minute; rebuilt when missing."""
    out = CACHE / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    lock = REPO / "infra" / "requirements.lock"
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-r", str(lock), "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    need_engine()
    e = Engine()
    with e:
        yield e
    assert e.leftovers() == []


@pytest.fixture(scope="module")
def image(engine: Engine) -> Iterator[dict[str, Any]]:
    """The project's image on the bookworm base; its build time and size."""
    base = engine.base_image()
    with serve(wheels()) as url:
        t0 = time.monotonic()
        build = ["build", "--network", "host", "-f", "infra/Dockerfile", "-t", TAG]
        args = {
            "BASE_IMAGE": base,
            "PYTHON": "system",
            "BAKE_WEIGHTS": "0",  # no hub here; the studies use no pretrained weights
            "PIP_SOURCE": f"--no-index --find-links {url}",
            "IMAGE": TAG,
        }
        for k, v in args.items():
            build += ["--build-arg", f"{k}={v}"]
        engine.docker(
            [*build, str(REPO)],
            timeout=1800,
        )
        build_s = time.monotonic() - t0
    info = json.loads(engine.docker(["image", "inspect", TAG]).stdout)[0]
    facts = {"tag": TAG, "id": info["Id"], "size": info["Size"], "build_s": build_s}
    print(f"\nimage {TAG}: built in {build_s:.0f} s, {info['Size'] / 1e9:.2f} GB, {info['Id']}")
    yield facts
    engine.docker(["rmi", "-f", TAG], check=False)


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A directory uid 1000 can reach (pytest's tmp dirs are root's, mode 700): the data set,
    and results directories the container's user owns."""
    root = Path(tempfile.mkdtemp(prefix="adh-img", dir="/tmp"))
    root.chmod(0o755)
    synth(root / "data", ("disc",), seed=0, **TINY)
    for path in (root / "data", *(root / "data").rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def results_dir(shared: Path, name: str) -> Path:
    path = shared / name
    path.mkdir()
    os.chown(path, 1000, 1000)
    return path


def records(results: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    out = {}
    for path in sorted(results.glob("*/runs/**/*.json")):
        rec = json.loads(path.read_text())
        out[(rec["category"], rec["seed"], rec["repeat"])] = rec
    return out


def test_image_runs_as_uid_1000_and_records_itself(engine: Engine, image: dict[str, Any]) -> None:
    script = (
        "import json, os; from harness.fingerprint import image; "
        "print(json.dumps({'uid': os.getuid(), 'image': image()}))"
    )
    out = engine.docker(["run", "--rm", "--network", "none", image["tag"], "python", "-c", script]).stdout
    facts = json.loads(out)
    assert facts["uid"] == 1000
    assert facts["image"]["tag"] == image["tag"]
    assert facts["image"]["base"] == "ad-harness-test-base:bookworm"
    assert len(facts["image"]["content_id"]) == 64
    # No CA bundle, pip cache or build context left behind.
    paths = ["/run/secrets", "/src", "/tmp/src", "/tmp/requirements.lock", "/root/.cache/pip"]
    ls = engine.docker(
        ["run", "--rm", "--network", "none", "--user", "0", image["tag"], "ls", "-d", *paths], check=False
    )
    assert ls.stdout.split() == []  # none of them exists


def test_a_study_in_the_image_gives_the_records_made_outside(
    engine: Engine, image: dict[str, Any], shared: Path
) -> None:
    inside, outside = results_dir(shared, "inside"), results_dir(shared, "outside")
    run = ["run", "--rm", "--network", "none", "--shm-size", "1g", "--user", "1000:1000"]
    run += ["-v", f"{shared / 'data'}:/data:ro", "-v", f"{inside}:/results"]
    for k, v in RUN_ENV.items():
        run += ["-e", f"{k}={v}"]
    sweep = ["harness", "sweep", "/app/experiments/smoke.yaml", "--set", "data.root=/data", *STUDY]
    out = engine.docker([*run, image["tag"], *sweep, "--results", "/results"], timeout=900)
    assert "2 ok, 0 failed" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    here = [str(BIN / "harness"), "sweep", str(REPO / "experiments" / "smoke.yaml")]
    here += ["--set", f"data.root={shared / 'data'}", *STUDY, "--results", str(outside)]
    host = subprocess.run(
        here,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **RUN_ENV},
    )
    assert host.returncode == 0, host.stdout[-3000:] + host.stderr[-3000:]
    a, b = records(inside), records(outside)
    assert sorted(a) == sorted(b) == [("disc", 0, 0), ("disc", 1, 0)]
    report = []
    for key in sorted(a):
        ra, rb = a[key], b[key]
        assert ra["status"] == rb["status"] == "ok"
        assert ra["data"]["sha256"] == rb["data"]["sha256"]  # the same images, read-only inside
        diff = fingerprint_diff(ra["environment"], rb["environment"])
        same = ra["predictions"]["scores_sha256"] == rb["predictions"]["scores_sha256"]
        report.append(f"{key}: scores {'equal' if same else 'differ'}; environment differs in {sorted(diff)}")
        assert ra["environment"]["image"]["tag"] == image["tag"]
        assert rb["environment"]["image"] is None
        assert ra["environment"]["environment_id"] != rb["environment"]["environment_id"]
        # What decides the numbers is the same inside and out: the machine, torch and its
        # build, the ISA it dispatches to, the run's settings. Then the scores are the same bits.
        numeric = ("machine_id", "torch", "torchvision", "anomalib", "numpy", "torch_build", "execution")
        if all(ra["environment"][k] == rb["environment"][k] for k in numeric):
            assert same, report[-1]
        else:
            assert diff, report[-1]  # the fingerprint says why they may differ
    # The checker sees two environments and compares the same seeds across them.
    check = subprocess.run(
        [str(BIN / "harness"), "check", str(inside), str(outside)], capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stderr[-3000:]
    (across,) = [ln for ln in check.stdout.splitlines() if "2 seeds:" in ln]
    if all("scores equal" in r for r in report):
        assert "2 seeds: bitwise" in across
    assert "environment differs in" in across
    assert "image" in across
    print("\n" + "\n".join([*report, across.strip()]))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Network:
    """A private /24 for containers: a bridge in a namespace of the test's own, a veth pair
    per container made inside the namespaces (no end in the machine's own network), and a
    ``client`` namespace on it for what a user's laptop runs (``ray job submit``). Ray's nodes
    get their own addresses, so each uses its default ports and none reaches another network."""

    def __init__(self) -> None:
        tag = f"adh{os.getpid()}"
        self.bridge, self.client = f"{tag}br", f"{tag}cl"
        self.prefix = f"10.213.{os.getpid() % 250}"
        self.n = 0
        try:
            for ns in (self.bridge, self.client):
                ip("netns", "add", ns)
            ip("-n", self.bridge, "link", "add", "dev", "br0", "type", "bridge")
            ip("-n", self.bridge, "link", "set", "dev", "br0", "up")
            self.client_address = self.attach(["-n", self.client])
        except BaseException:
            self.close()  # half made: what was made goes
            raise

    def attach(self, where: list[str]) -> str:
        """A link from a namespace (``-n NAME``, or ``nsenter`` into a container's) to the bridge."""
        self.n += 1
        address, peer = f"{self.prefix}.{self.n}", f"p{self.n}"
        run = ["ip", *where] if where[0] == "-n" else [*where, "ip"]
        for args in (
            ["link", "add", "dev", "eth1", "type", "veth", "peer", "name", peer, "netns", self.bridge],
            ["addr", "add", f"{address}/24", "dev", "eth1"],
            ["link", "set", "dev", "eth1", "up"],
            ["link", "set", "dev", "lo", "up"],
        ):
            subprocess.run([*run, *args], check=True, capture_output=True, timeout=30)
        ip("-n", self.bridge, "link", "set", "dev", peer, "master", "br0")
        ip("-n", self.bridge, "link", "set", "dev", peer, "up")
        return address

    def close(self) -> None:
        for ns in (self.client, self.bridge):  # their veths go with them
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network()
    try:
        yield net
    finally:
        net.close()
    assert not {net.bridge, net.client} & set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                             text=True).stdout.split())  # fmt: skip


def test_a_head_and_a_worker_from_the_image_run_a_submitted_study(
    engine: Engine, image: dict[str, Any], shared: Path, network: Network
) -> None:
    results = results_dir(shared, "cluster")
    token = secrets.token_hex(32)
    env = {**RUN_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # Each container waits for its link (the test adds it from outside and writes its address
    # to /tmp/link-up), then starts its Ray node on that address.
    wait = 'until [ -s /tmp/link-up ]; do sleep 0.2; done; exec "$@" --node-ip-address="$(cat /tmp/link-up)"'
    addresses = {}
    for name in ("head", "worker"):
        run = ["run", "-d", "--network", "none", "--shm-size", "1g", "--user", "1000:1000"]
        run += ["--name", f"{name}-{os.getpid()}", "-v", f"{shared / 'data'}:/data:ro", "-v", f"{results}:/results"]
        for k, v in env.items():
            run += ["-e", f"{k}={v}"]
        ray = ["ray", "start", "--block", "--disable-usage-stats", "--object-store-memory=200000000"]
        if name == "head":  # as compose runs it: the driver lives here, runs go to the worker
            ray += ["--head", "--port=6379", "--dashboard-host=0.0.0.0", "--num-cpus=0"]
        else:
            ray += [f"--address={addresses['head']}:6379", "--num-cpus=2"]
        engine.docker([*run, image["tag"], "sh", "-c", wait, "sh", *ray])
        pid = engine.docker(["inspect", "-f", "{{.State.Pid}}", f"{name}-{os.getpid()}"]).stdout.strip()
        addresses[name] = network.attach(["nsenter", "-t", pid, "-n"])
        engine.docker(["exec", f"{name}-{os.getpid()}", "sh", "-c", f"echo {addresses[name]} > /tmp/link-up"])
    url = f"http://{addresses['head']}:8265"
    client_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    client_env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # conftest's loopback switch: not this cluster's
    client = ["ip", "netns", "exec", network.client, str(BIN / "ray")]
    deadline = time.monotonic() + 180
    while True:  # the dashboard up and both nodes in
        out = subprocess.run([*client, "list", "nodes", "--address", url, "--format", "json"], capture_output=True,
                             text=True, timeout=60, env=client_env)  # fmt: skip
        nodes = json.loads(out.stdout) if out.stdout.startswith("[") else []  # else "No resource in the cluster"
        if sum(n["state"] == "ALIVE" for n in nodes) == 2:
            break
        if time.monotonic() > deadline:
            logs = [engine.docker(["logs", f"{n}-{os.getpid()}"], check=False) for n in ("head", "worker")]
            pytest.fail(f"no two-node cluster: {out.stderr[-1000:]}\n{[o.stdout[-2000:] for o in logs]}")
        time.sleep(2)
    assert {n["node_ip"] for n in nodes} == {addresses["head"], addresses["worker"]}
    sweep = ["harness", "sweep", "/app/experiments/smoke.yaml", "--address", "auto", "--set", "data.root=/data"]
    sweep += [*STUDY, "--results", "/results"]
    runtime_env = json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}})
    job = subprocess.run(
        [*client, "job", "submit", "--address", url, "--runtime-env-json", runtime_env, "--", *sweep],
        capture_output=True,
        text=True,
        timeout=900,
        env=client_env,
    )
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "sweep smoke: 2 ok, 0 failed" in job.stdout, job.stdout[-4000:]
    recs = records(results)
    assert sorted(recs) == [("disc", 0, 0), ("disc", 1, 0)]
    worker_node = [n["node_id"] for n in nodes if not n["is_head_node"]]
    assert {r["node_id"] for r in recs.values()} == set(worker_node)  # the head has no CPU for runs
    assert all(r["environment"]["image"]["tag"] == image["tag"] for r in recs.values())
