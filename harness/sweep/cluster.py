"""The Ray cluster's life cycle: start a local one or join one, check what it can hold.

The embedded default is this machine only: on loopback, reachable from no other host, with
Ray's token auth. Ray allows one cluster per process; ``cluster`` can be nested at the same
address (the demo runs its two studies on one local cluster).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.spec import Device, ExperimentSpec

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Set by `ray job submit` for the job's entrypoint: the cluster the job runs on.
JOB_ADDRESS_ENV = "RAY_ADDRESS"
# A lost node is declared dead within about period x threshold (Ray's defaults take about a
# minute); a task on a dead connection fails once gRPC's keepalive gives up on it (Ray's
# default waits five minutes before the first probe). See docs/fault-tolerance.md.
NODE_FAILURE_CONFIG = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 10,
    "grpc_client_keepalive_time_ms": 5000,
    "grpc_client_keepalive_timeout_ms": 5000,
}


def node_failure_env() -> dict[str, str]:
    """``NODE_FAILURE_CONFIG`` as the variables ``ray start`` reads (head and workers alike)."""
    return {f"RAY_{key}": str(value) for key, value in NODE_FAILURE_CONFIG.items()}


# Passed from the driver to every worker: on a cluster, workers do not inherit its shell.
PASS_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME", "CUBLAS_WORKSPACE_CONFIG")


def ray_defaults(address: str | None) -> None:
    """No usage stats; a local cluster on loopback with token auth.

    Ray resolves 127.0.0.1 to the routable address unless "clusters" are off, its switch for
    single-machine Ray (named for Windows and macOS), read when Ray is first imported. Token
    auth is Ray's default for a local cluster; saying so explicitly spares every sweep Ray's
    warning that it chose it.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        os.environ.setdefault(LOOPBACK_ENV, "0")
        os.environ.setdefault("RAY_AUTH_MODE", "token")


_open: list[str | None] = []  # the clusters ``cluster`` holds open in this process


def held() -> list[str | None]:
    """The addresses of the clusters this process holds open, innermost last (None: a local one)."""
    return list(_open)


@contextlib.contextmanager
def cluster(address: str | None) -> Iterator[None]:
    """Join the cluster at ``address``, or start a local one of this process's own.

    Without ``address``, a job's entrypoint (``ray job submit`` sets ``RAY_ADDRESS``) joins
    the job's cluster; anywhere else a sweep starts its own, never one that a ``ray start``
    left running or left named in Ray's current-cluster file. Inside an open ``cluster`` of
    the same address, it is that one; another address is an error, as Ray allows one per
    process. It says what it does: starting takes seconds.
    """
    join = joins(address)
    if _open:
        if _open[-1] != join:
            current = _open[-1] or "a local Ray cluster"
            raise HarnessError(f"this process already holds {current}; it cannot also join {join or 'a local one'}")
        yield
        return
    ray_defaults(join)
    if join is not None:
        check_reachable(join, "--address" if address else JOB_ADDRESS_ENV)
    local = "starting a local Ray cluster (this machine only, on loopback; stopped at the end)"
    print(f"joining the Ray cluster at {join}" if join else local, flush=True)
    import ray

    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    main = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if join is None:
            # "local": a cluster of its own, whatever a `ray start` left in Ray's current-cluster
            # file or runs on this machine. No dashboard: half the memory.
            ray.init(address="local", include_dashboard=False, **quiet)  # type: ignore[arg-type]
        else:
            ray.init(address=join, **quiet)  # type: ignore[arg-type]
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.AuthenticationError) as exc:
        where = f"the Ray cluster at {join}" if join else "a local Ray cluster"
        token = os.environ.get("RAY_AUTH_MODE") == "token"
        hint = "" if token or join is None else " (a cluster with token auth needs RAY_AUTH_MODE=token and its token)"
        raise HarnessError(f"cannot start or join {where}: {str(exc).splitlines()[0]}{hint}") from None
    _raylet_messages_to_log()
    if main:
        # Ray's init makes SIGTERM exit the process mid-shutdown (an abort, a C++ stack dump):
        # a SIGTERM is a Ctrl-C here, so the cluster is stopped as after one.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    _open.append(join)
    try:
        yield
    finally:
        _open.pop()
        ray.shutdown()
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def joins(address: str | None) -> str | None:
    """The cluster a sweep joins: ``address``, else the job's (``RAY_ADDRESS`` set by
    ``ray job submit``); None: it starts its own."""
    return address or os.environ.get(JOB_ADDRESS_ENV) or None


def check_reachable(address: str, given_by: str = "--address", timeout_s: float = 5.0) -> None:
    """A HOST:PORT that nothing answers on is an error now (Ray would retry it for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # `auto`, or a ray:// client address: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise HarnessError(f"{given_by} {address}: no Ray cluster answers there ({why})") from None


_ray_log: list[Path] = []  # where Ray's own messages to the driver go (innermost last)


@contextlib.contextmanager
def ray_log(path: Path) -> Iterator[None]:
    """Send Ray's messages to the driver (a worker died, a node was marked dead) to ``path``
    while a sweep runs: its progress lines say what happened, in one line."""
    _ray_log.append(path)
    try:
        yield
    finally:
        _ray_log.pop()


def _raylet_messages_to_log() -> None:
    """Ray prints the messages it publishes to a driver (``pid`` "raylet": a worker died, a
    node was marked dead) as paragraphs on stdout, whatever ``log_to_driver`` says; the
    printer is a module function its listener thread looks up on each message."""
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "harness", False):
        return

    def to_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet" or not _ray_log:
            original(data, ignore_prefix)
            return
        with contextlib.suppress(OSError):
            _ray_log[-1].parent.mkdir(parents=True, exist_ok=True)
            with _ray_log[-1].open("a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} " + "\n".join(data.get("lines", [])) + "\n")

    to_log.harness = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_log


def check_resources(spec: ExperimentSpec) -> None:
    """Refuse, before any run, a per-run request that no node of the cluster can meet."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for key, name in (("cpu", "CPU"), ("gpu", "GPU")):
        want = getattr(spec.resources, key)
        most = max((float(n.get(name, 0)) for n in nodes), default=0.0)
        if want > most:
            raise HarnessError(
                f"resources.{key}={want:g} per run, but no node of this cluster has more than {most:g} {name}s "
                f"(lower it with --set resources.{key}=...)"
            )


def slots(spec: ExperimentSpec) -> int:
    """How many of the spec's runs the cluster can hold at once."""
    import ray

    total = ray.cluster_resources()
    fits = [
        int(total.get(name, 0) // want)
        for name, want in (("CPU", spec.resources.cpu), ("GPU", spec.resources.gpu))
        if want
    ]
    n = max(1, min(fits)) if fits else 1
    return min(n, spec.max_concurrent) if spec.max_concurrent else n


def run_device(spec: ExperimentSpec) -> Device:
    """A run uses the GPU Ray gave it, and no GPU when it asked for none.

    Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` alone for zero-GPU tasks: "auto" would take a GPU
    nobody reserved.
    """
    return "cuda" if spec.resources.gpu > 0 else "cpu"


def task_options(spec: ExperimentSpec) -> dict[str, Any]:
    return {"num_cpus": spec.resources.cpu, "num_gpus": spec.resources.gpu}


def runtime_env(env_vars: dict[str, str]) -> dict[str, Any]:
    """Ray options for a task that must start in a worker process with ``env_vars`` (what torch
    reads when it loads). Ray keeps a pool of workers per runtime environment, on a local
    cluster, a real one and under ``ray job submit`` alike; the job's own variables stay."""
    return {"runtime_env": {"env_vars": env_vars}} if env_vars else {}


def check_environments(spec: ExperimentSpec) -> None:
    """Refuse, before any run, a variant that the cluster's workers would not honour.

    Each variant is tried in a worker started as its runs will be: torch loads there and says
    which ISA it dispatches to (a CPU without the one asked for falls back silently).
    """
    if not spec.environments:
        return
    import ray

    from harness.sweep.worker import probe_environment

    probe = ray.remote(probe_environment)
    refs = {
        name: probe.options(num_cpus=0, **runtime_env(env.env_vars())).remote(env.settings())
        for name, env in spec.environments.items()
    }
    for name, ref in refs.items():
        why = ray.get(ref)
        if why is not None:
            raise HarnessError(f"environments.{name}: {why}")


def worker_env() -> dict[str, str]:
    """The driver's settings that workers need (``PASS_ENV``)."""
    return {k: os.environ[k] for k in PASS_ENV if k in os.environ}
