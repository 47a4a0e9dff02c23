"""A multi-host Ray cluster on one machine: each host is a Linux network namespace.

``NetnsCluster`` makes one namespace per host (``head``, ``w1``..``wN``, ``client``), each
with its own address on a private /24 and its loopback, joined by veth pairs to a bridge that
lives in a namespace of its own. Nothing is configured in the machine's own network: each veth
pair is created inside the cluster's namespaces (no end ever exists in the root one), and the
namespaces have no default route, so their traffic reaches only each other. A Ray head runs in
``head`` (no CPU for runs: the job's driver lives there, with the dashboard), a one-CPU Ray
worker node in each worker host, and ``client`` runs what a user's laptop would: ``ray job
submit``, the dashboard's job API, a driver.

What the hosts share, unlike real machines: the file system (the results directory is a tmp
path that every host sees at the same absolute path, as a shared volume would be), the PID
space, and the CPUs. A driver started in ``client`` therefore finds the head's raylet by its
process and unix sockets, which a real remote client could not.

Ray's token auth is on by default: a random token per cluster, in a file only root reads, given
to every node (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``) and to what ``exec``/``popen``
run unless told not to (``token=False``). No variable of the caller's environment reaches the
cluster's processes except HOME: they get ``BASE_ENV``, the auth settings and ``env``.

The API (hosts by name: ``head``, ``w1``.., ``client``)::

    with NetnsCluster(workers=2, env={"RAY_health_check_period_ms": "1000"}) as c:
        c.hosts["w1"].address, c.gcs_address, c.dashboard_url, c.token
        job = c.submit(["harness", "sweep", "/abs/spec.yaml", "--address", "auto", "--results", "/abs/r"],
                       env={"WANDB_MODE": "disabled"})          # `ray job submit --no-wait` from client
        c.status(job), c.logs(job), c.job(job), c.stop_job(job)
        c.wait(job, timeout=600)                                # -> SUCCEEDED / FAILED / STOPPED
        c.alive()                                               # {"head": node_id, "w1": ..., ...}
        c.nodes()                                               # every node, dead ones too (state API)
        c.cut("w1"); c.restore("w1")                            # its link down / up
        c.kill_host("w2"); c.start_node("w2")                   # SIGKILL all its processes; a new node
        c.wait_nodes(["head", "w1", "w2"], timeout=60)          # until exactly these are alive
        c.exec("client", argv, token=False, env={...})          # run to the end in a host
        c.popen("w1", argv)                                     # start in a host, stopped at close
        c.http("GET", "/api/jobs/", token=False)                # Response(status=401, body=...)
    assert c.leftovers() == []                                  # namespaces, veths, processes, files

Used by the tests (``tests/test_netns_cluster.py``) and by ``benchmarks/netns_cluster.py``.
Needs root and ``ip netns``; :func:`unavailable` says why not. Everything it starts runs in a
process group of its own and is stopped by PID; :meth:`NetnsCluster.close` then kills what is
left in each namespace, removes the namespaces (their veths with them) and the cluster's
directory, even when the block raised.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent  # the virtualenv's bin: python, ray, harness
GCS_PORT = 6379
DASHBOARD_PORT = 8265
# Where `ray start --head` records its cluster for a later `ray.init()` on this machine. With
# --temp-dir it writes into that dir instead; should this cluster's address still land here,
# close() puts back what was there (another test's Ray may write the file meanwhile: its
# content is left alone).
RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# What every process of the cluster gets, whatever the caller's environment says (the test
# session's RAY_AUTH_MODE=disabled and loopback-only switch included: they are not passed on).
BASE_ENV = {
    "PATH": f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "MALLOC_MMAP_THRESHOLD_": "1048576",
}
# A request from inside a namespace: the test process itself lives in the root one.
_HTTP = r"""
import json, sys, urllib.error, urllib.request
q = json.load(sys.stdin)
data = None if q["body"] is None else q["body"].encode()
r = urllib.request.Request(q["url"], data=data, method=q["method"], headers=q["headers"])
try:
    with urllib.request.urlopen(r, timeout=q["timeout"]) as resp:
        out = {"status": resp.status, "body": resp.read().decode("utf-8", "replace")}
except urllib.error.HTTPError as e:
    out = {"status": e.code, "body": e.read().decode("utf-8", "replace")}
except OSError as e:
    out = {"status": None, "body": repr(e)}
json.dump(out, sys.stdout)
"""
_serial = itertools.count()


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): they need root and `ip netns`."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root (tests/netns.py)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return f"`ip netns` does not work here: {out.stderr.strip()}"
    return None


class ClusterError(RuntimeError):
    """The cluster did not come up, or a command against it failed."""


@dataclass(frozen=True)
class Host:
    """One machine of the cluster: a network namespace with one address."""

    name: str  # head, w1, w2, ..., client
    netns: str  # the namespace, unique to this cluster (ip netns list)
    address: str
    veth: str  # the host's end of its link to the bridge (cut/restore set it down/up)
    port: str  # the bridge's end, in the bridge namespace
    temp_dir: Path  # Ray's --temp-dir on this host (short: Ray's socket paths must stay < 108 chars)


@dataclass(frozen=True)
class Response:
    status: int | None  # None: no HTTP answer (connection refused, timed out, unreachable)
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


class NetnsCluster:
    """A Ray cluster of ``workers`` worker hosts, a head and a client, on private namespaces.

    ``root``: a directory of the cluster's own (Ray's temp dirs, node logs, the token file);
    removed at close. ``env``: Ray settings for every node (``RAY_health_check_period_ms``...).
    ``auth``: Ray's token auth (True: a random token; a string: that token; False: off).
    ``subnet``: the third octet of 10.231.X.0/24 (default: from the PID; the addresses exist
    only inside this cluster's namespaces, so two clusters may even share one).
    ``ray=False``: the hosts and their network only, no Ray node started.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        workers: int = 2,
        cpus_per_worker: int = 1,
        env: Mapping[str, str] | None = None,
        auth: bool | str = True,
        subnet: int | None = None,
        object_store_mb: int = 128,
        start_timeout_s: float = 120.0,
        ray: bool = True,
    ) -> None:
        if workers < 0:
            raise ValueError("workers: 0 or more")
        if root is not None and len(str(root)) > 40:
            # Ray's unix sockets live some 60 characters below a node's temp dir, and a unix
            # socket's path has at most 107.
            raise ValueError(f"root {root}: at most 40 characters (short_tmp() makes one)")
        self.root = Path(root) if root is not None else short_tmp()
        self.workers = [f"w{i}" for i in range(1, workers + 1)]
        self.cpus_per_worker = cpus_per_worker
        # A worker started with the head waits for its GCS up to a minute (Ray's default: 20 s).
        self.node_env = {"RAY_gcs_server_port_wait_time_s": "60", **(env or {})}
        self.token: str | None = (secrets.token_hex(32) if auth is True else auth) or None
        self.object_store_mb = object_store_mb
        self.start_timeout_s = start_timeout_s
        self.ray = ray
        n = next(_serial)
        self.tag = f"adh{os.getpid()}{'' if n == 0 else f'x{n}'}"  # namespaces: unique per cluster
        ifbase = f"v{os.getpid():x}-{n:x}"  # interfaces too (15 characters at most)
        octet = subnet if subnet is not None else (os.getpid() + n) % 250 + 1
        if not 0 <= octet <= 255:
            raise ValueError(f"subnet {octet}: the third octet of 10.231.X.0/24")
        self.bridge_netns = f"{self.tag}-br"
        self.hosts: dict[str, Host] = {}
        for i, name in enumerate(["head", *self.workers, "client"]):
            self.hosts[name] = Host(
                name=name,
                netns=f"{self.tag}-{name}",
                address=f"10.231.{octet}.{i + 2}",
                veth=f"{ifbase}h{i}",
                port=f"{ifbase}b{i}",
                temp_dir=self.root / "ray" / name,
            )
        self.token_file = self.root / "auth_token"
        self._procs: list[subprocess.Popen[bytes]] = []  # everything started, each a process group
        self._nodes: dict[str, subprocess.Popen[bytes]] = {}  # host -> its `ray start --block`
        self._inodes: dict[str, int] = {}  # namespace -> its inode (finds its processes, even after removal)
        self._ray_file: bytes | None = None
        self._ray_dir_existed = True
        self._started = False

    # --- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> NetnsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Make the network, start the head and the workers, wait until every node is alive."""
        if self._started:
            raise ClusterError("already started")
        self._started = True
        self._ray_file = RAY_CURRENT_CLUSTER.read_bytes() if RAY_CURRENT_CLUSTER.exists() else None
        self._ray_dir_existed = RAY_CURRENT_CLUSTER.parent.exists()
        try:
            self._make_network()
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "logs").mkdir(exist_ok=True)
            if self.token:
                self.token_file.write_text(self.token)
                self.token_file.chmod(0o600)
            if not self.ray:
                return
            # All at once: a worker's `ray start` waits for the head's GCS (5 s less than in turn).
            for host in ["head", *self.workers]:
                self.start_node(host)
            self._wait_dashboard()
            self.wait_nodes(["head", *self.workers], self.start_timeout_s, _starting=True)
        except BaseException:
            self.close()
            raise

    def close(self, grace_s: float = 1.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL to whatever is left in each namespace after
        ``grace_s``), remove the namespaces, the root directory, and put Ray's cluster file back."""
        try:
            for proc in self._procs:
                _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self._live_pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            for proc in self._procs:
                _signal_group(proc, signal.SIGKILL)
            for name in list(self._inodes):
                self._kill_netns(name)
            for proc in self._procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        finally:
            for name in [*(h.netns for h in self.hosts.values()), self.bridge_netns]:
                if name in _netns_list():
                    subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
            shutil.rmtree(self.root, ignore_errors=True)
            self._restore_ray_file()

    def leftovers(self) -> list[str]:
        """What this cluster made that still exists: namespaces, veths, processes, files.

        Empty after :meth:`close`. Processes are found by their network namespace, so one that
        outlived the removal of its namespace's name is found too.
        """
        left = [f"netns {n}" for n in _netns_list() if n.startswith(f"{self.tag}-")]
        veths = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True).stdout
        ours = {h.veth for h in self.hosts.values()} | {h.port for h in self.hosts.values()}
        for line in veths.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name in ours:
                left.append(f"veth {name} in the root namespace")
        # A namespace's inode may be reused once it is freed: one that another cluster's named
        # namespace now has is not ours.
        others = {_inode(f"/run/netns/{n}") for n in _netns_list() if not n.startswith(f"{self.tag}-")}
        for pid, ns in self._pids_by_inode().items():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/net").st_ino not in others:
                    left.append(f"process {pid} ({_cmdline(pid)[:80]}) in netns {ns}")
        left += [f"process {p.pid} (not reaped)" for p in self._procs if p.poll() is None]
        if self.root.exists():
            left.append(f"directory {self.root}")
        if self._ray_file_is_ours():
            left.append(f"{RAY_CURRENT_CLUSTER} names this cluster")
        return left

    # --- the network ----------------------------------------------------------------------

    def _make_network(self) -> None:
        """Namespaces, a bridge in its own, and a veth pair per host made inside the namespaces."""
        br = self.bridge_netns
        self._add_netns(br)
        _ip("-n", br, "link", "add", "dev", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "dev", "br0", "up")
        for h in self.hosts.values():
            self._add_netns(h.netns)
            _ip("-n", h.netns, "link", "set", "dev", "lo", "up")
            # Created in the host's namespace with its peer in the bridge's: no end ever exists
            # in the root namespace.
            _ip("-n", h.netns, "link", "add", "dev", h.veth, "type", "veth", "peer", "name", h.port, "netns", br)
            _ip("-n", br, "link", "set", "dev", h.port, "master", "br0")
            _ip("-n", br, "link", "set", "dev", h.port, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.veth)
            _ip("-n", h.netns, "link", "set", "dev", h.veth, "up")

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._inodes[name] = os.stat(f"/run/netns/{name}").st_ino

    def cut(self, host: str) -> None:
        """Take ``host`` off the network: its link goes down (its processes keep running)."""
        h = self.hosts[host]
        _ip("-n", h.netns, "link", "set", "dev", h.veth, "down")

    def restore(self, host: str) -> None:
        """Put ``host`` back on the network (its address and route come back with the link)."""
        h = self.hosts[host]
        _ip("-n", h.netns, "link", "set", "dev", h.veth, "up")

    # --- processes --------------------------------------------------------------------------

    def env(self, *, token: bool = True, extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        """The environment of the cluster's processes: ``BASE_ENV``, the auth settings (with
        ``token``: the token file; without: token mode but no token) and ``extra`` (None
        removes a variable). HOME is the caller's unless ``extra`` says otherwise."""
        env = {**BASE_ENV, "HOME": os.environ.get("HOME", "/root")}
        if self.token:
            env["RAY_AUTH_MODE"] = "token"
            if token:
                env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        for k, v in (extra or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def popen(
        self,
        host: str,
        argv: Sequence[str],
        *,
        token: bool = True,
        env: Mapping[str, str | None] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``host``'s namespace, in a process group of its own; stopped at close.

        Returns once the process is inside the namespace (or has ended): ``ip netns exec`` joins
        it only after the fork, and a process still outside would escape ``kill_host`` and
        ``pids``. Output goes to ``log`` (default: ``root/logs/<host>-<n>.log``)."""
        netns = self.hosts[host].netns
        log = log or self.root / "logs" / f"{host}-{len(self._procs)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, *argv],
                env=self.env(token=token, extra=env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        deadline = time.monotonic() + 10
        while _inode(f"/proc/{proc.pid}/ns/net") != self._inodes[netns] and proc.poll() is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{argv[0]} did not enter {netns} within 10 s")
            time.sleep(0.01)
        return proc

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        token: bool = True,
        env: Mapping[str, str | None] | None = None,
        input: str | None = None,
        timeout: float = 120.0,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host``'s namespace to its end (its whole process group is killed
        past ``timeout``, then TimeoutExpired). ``check``: a non-zero exit raises ClusterError."""
        cmd = ["ip", "netns", "exec", self.hosts[host].netns, *argv]
        proc = subprocess.Popen(
            cmd,
            env=self.env(token=token, extra=env),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # what it left behind in its group
        done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and done.returncode != 0:
            raise ClusterError(f"{shlex.join(argv)} on {host} exited {done.returncode}: {(err or out)[-2000:]}")
        return done

    def start_node(self, host: str) -> subprocess.Popen[bytes]:
        """``ray start --block`` on ``host``: the head on ``head``, a worker node elsewhere
        (again after :meth:`kill_host`, to bring a host back)."""
        h = self.hosts[host]
        common = [
            "--block",
            f"--node-ip-address={h.address}",
            f"--temp-dir={h.temp_dir}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            "--num-gpus=0",
            "--disable-usage-stats",
        ]
        if host == "head":
            args = [
                "--head",
                f"--port={GCS_PORT}",
                "--num-cpus=0",  # the driver lives here; runs go to the workers
                f"--dashboard-host={h.address}",
                f"--dashboard-port={DASHBOARD_PORT}",
                "--include-dashboard=true",
            ]
        elif host in self.workers:
            args = [f"--address={self.gcs_address}", f"--num-cpus={self.cpus_per_worker}"]
        else:
            raise ValueError(f"{host} runs no Ray node (head: head; workers: {', '.join(self.workers)})")
        proc = self.popen(host, [str(BIN / "ray"), "start", *args, *common], env=self.node_env, log=self._log(host))
        self._nodes[host] = proc
        return proc

    def kill_host(self, host: str) -> list[int]:
        """Kill every process of ``host`` at once (SIGKILL to all of its namespace's processes),
        as a machine that loses power; returns their PIDs. Its network stays up."""
        killed = self._kill_netns(self.hosts[host].netns)
        self._nodes.pop(host, None)
        for proc in self._procs:
            if proc.pid in killed:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        return killed

    def pids(self, host: str) -> list[int]:
        """The processes in ``host``'s namespace (``ip netns pids``)."""
        return _netns_pids(self.hosts[host].netns)

    def _kill_netns(self, netns: str) -> list[int]:
        """SIGKILL every process in ``netns`` until none is left (children forked meanwhile too)."""
        inode = self._inodes[netns]
        killed: list[int] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = [pid for pid, ino in _netns_inodes().items() if ino == inode]
            if not pids:
                return killed
            for pid in pids:
                if _kill_if_in_netns(pid, inode):
                    killed.append(pid)
            time.sleep(0.05)
        raise ClusterError(f"processes of {netns} survive SIGKILL: {_netns_pids(netns)}")

    def _live_pids(self) -> list[int]:
        return list(self._pids_by_inode())

    def _pids_by_inode(self) -> dict[int, str]:
        by_inode = {ino: name for name, ino in self._inodes.items()}
        return {pid: by_inode[ino] for pid, ino in _netns_inodes().items() if ino in by_inode}

    def _log(self, host: str) -> Path:
        return self.root / "logs" / f"{host}-ray-start.log"

    def _ray_file_is_ours(self) -> bool:
        with contextlib.suppress(OSError):
            return RAY_CURRENT_CLUSTER.read_text().strip() == self.gcs_address
        return False

    def _restore_ray_file(self) -> None:
        if not self._ray_file_is_ours():
            return
        if self._ray_file is None:
            RAY_CURRENT_CLUSTER.unlink(missing_ok=True)
            if not self._ray_dir_existed:
                with contextlib.suppress(OSError):
                    RAY_CURRENT_CLUSTER.parent.rmdir()  # only when empty
        else:
            RAY_CURRENT_CLUSTER.write_bytes(self._ray_file)

    # --- the cluster as a client sees it --------------------------------------------------

    @property
    def gcs_address(self) -> str:
        return f"{self.hosts['head'].address}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.hosts['head'].address}:{DASHBOARD_PORT}"

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        host: str = "client",
        token: bool | str = True,
        timeout: float = 10.0,
    ) -> Response:
        """A request to the head's dashboard from ``host``. ``token``: send the cluster's token
        (True), none (False), or that string."""
        headers = {"Content-Type": "application/json"}
        bearer = self.token if token is True else (token or None)
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        q = {
            "url": self.dashboard_url + path,
            "method": method,
            "headers": headers,
            "body": None if body is None else json.dumps(body),
            "timeout": timeout,
        }
        out = self.exec(host, [sys.executable, "-I", "-S", "-c", _HTTP], input=json.dumps(q), timeout=timeout + 10)
        if out.returncode != 0:
            raise ClusterError(f"request {method} {path} from {host}: {out.stderr[-2000:]}")
        r = json.loads(out.stdout)
        return Response(r["status"], r["body"])

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the cluster knows (alive or dead), as the dashboard's state API lists them,
        each with ``host``: the name of the host at its address."""
        r = self.http("GET", "/api/v0/nodes?limit=1000&detail=true")
        if r.status != 200:
            raise ClusterError(f"GET /api/v0/nodes: {r.status} {r.body[:500]}")
        by_address = {h.address: h.name for h in self.hosts.values()}
        found: list[dict[str, Any]] = r.json()["data"]["result"]["result"]
        for n in found:
            n["host"] = by_address.get(n.get("node_ip", ""))
        return found

    def alive(self) -> dict[str, str]:
        """host -> node id of every alive node."""
        return {n["host"]: n["node_id"] for n in self.nodes() if n.get("state") == "ALIVE"}

    def wait_nodes(self, hosts: Iterable[str], timeout: float, *, _starting: bool = False) -> None:
        """Wait until the alive nodes are exactly those of ``hosts`` (after a fault: until Ray
        has declared a lost host's node dead, or a restarted one alive). TimeoutError past
        ``timeout``."""
        want = sorted(hosts)
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            if _starting:
                self._check_nodes_running()
            with contextlib.suppress(ClusterError):
                seen = sorted(self.alive())
                if seen == want:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"alive nodes on {seen}, wanted {want} within {timeout:.0f} s")

    def _wait_dashboard(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last: Response | None = None
        while time.monotonic() < deadline:
            self._check_nodes_running()
            last = self.http("GET", "/api/version", timeout=3)
            if last.status == 200:
                return
            time.sleep(0.3)
        raise ClusterError(f"the head's dashboard did not answer within {self.start_timeout_s:.0f} s: {last}")

    def _check_nodes_running(self) -> None:
        for host, proc in self._nodes.items():
            if proc.poll() is not None:
                tail = self._log(host).read_text(errors="replace")[-3000:]
                raise ClusterError(f"`ray start` on {host} exited {proc.returncode}:\n{tail}")

    # --- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        entrypoint: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        working_dir: Path | None = None,
        submission_id: str | None = None,
        via: str = "cli",
    ) -> str:
        """Submit a job from the client host and return its id without waiting for it.

        ``entrypoint``: argv, or a command line that ``shlex.split`` makes one (the job runs
        ``shlex.join(argv)`` in a shell, as ``ray job submit -- ARGV`` does: no pipes). ``env``: the job's
        variables (its runtime env). ``via``: ``cli`` (``ray job submit --no-wait``, as a user
        would) or ``http`` (``POST /api/jobs/``, a second faster).
        """
        argv = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
        job_id = submission_id or f"adh-{uuid.uuid4().hex[:12]}"
        runtime_env: dict[str, Any] = {}
        if env:
            runtime_env["env_vars"] = dict(env)
        if working_dir is not None:
            runtime_env["working_dir"] = str(working_dir)
        if via == "http":
            body = {"entrypoint": shlex.join(argv), "submission_id": job_id, "runtime_env": runtime_env}
            r = self.http("POST", "/api/jobs/", body)
            if r.status != 200:
                raise ClusterError(f"POST /api/jobs/: {r.status} {r.body[:2000]}")
            return str(r.json()["submission_id"])
        if via != "cli":
            raise ValueError(f"via={via!r}: cli or http")
        cli = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--no-wait"]
        cli += ["--submission-id", job_id]
        if runtime_env:
            cli += ["--runtime-env-json", json.dumps(runtime_env)]
        self.exec("client", [*cli, "--", *argv], timeout=120, check=True)  # Ray quotes argv back (shlex.join)
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's details (status, message, driver_exit_code, ...) from ``GET /api/jobs/ID``."""
        r = self.http("GET", f"/api/jobs/{job_id}")
        if r.status != 200:
            raise ClusterError(f"GET /api/jobs/{job_id}: {r.status} {r.body[:500]}")
        return dict(r.json())

    def status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self.job(job_id)["status"])

    def logs(self, job_id: str) -> str:
        """The job driver's output so far."""
        r = self.http("GET", f"/api/jobs/{job_id}/logs", timeout=30)
        if r.status != 200:
            raise ClusterError(f"GET /api/jobs/{job_id}/logs: {r.status} {r.body[:500]}")
        return str(r.json()["logs"])

    def wait(self, job_id: str, timeout: float, poll_s: float = 1.0) -> str:
        """Wait until the job ends; its final status. TimeoutError past ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status in TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
            time.sleep(poll_s)

    def stop_job(self, job_id: str) -> bool:
        """Ask Ray to stop the job (its driver gets SIGTERM); False if it had ended already."""
        r = self.http("POST", f"/api/jobs/{job_id}/stop")
        if r.status != 200:
            raise ClusterError(f"POST /api/jobs/{job_id}/stop: {r.status} {r.body[:500]}")
        return bool(r.json()["stopped"])


# --- helpers ----------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _netns_inodes() -> dict[int, int]:
    """pid -> inode of its network namespace, for every process (what `ip netns pids` reads)."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry.name)] = os.stat(f"/proc/{entry.name}/ns/net").st_ino
    return found


def _kill_if_in_netns(pid: int, inode: int) -> bool:
    """SIGKILL ``pid`` if it is (still) a process of the namespace ``inode``: the check is made
    through a pidfd, so a PID reused meanwhile by another process is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if os.stat(f"/proc/{pid}/ns/net").st_ino != inode:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Signal the process group ``proc`` leads (start_new_session=True), unless it is reaped."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def short_tmp(prefix: str = "adh") -> Path:
    """A fresh directory directly under /tmp: Ray's unix socket paths must stay under 108 chars."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
