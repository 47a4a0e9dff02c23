"""The Ray cluster's life cycle: start a local one or join one, check what it can hold.

The embedded default is this machine only: on loopback, reachable from no other host, with
Ray's token auth. Ray allows one cluster per process; ``cluster`` can be nested at the same
address (the demo runs its two studies on one local cluster).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from harness.errors import HarnessError
from harness.spec import Device, ExperimentSpec

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
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
    """Join the cluster at ``address`` (``auto`` inside ``ray job submit``), or start a local one.

    Inside an open ``cluster`` of the same address, it is that one; another address is an
    error, as Ray allows one per process. It says what it does: starting takes seconds.
    """
    if _open:
        if _open[-1] != address:
            current = _open[-1] or "a local Ray cluster"
            raise HarnessError(f"this process already holds {current}; it cannot also join {address or 'a local one'}")
        yield
        return
    ray_defaults(address)
    if address is not None:
        check_reachable(address)
    local = "starting a local Ray cluster (this machine only, on loopback; stopped at the end)"
    print(f"joining the Ray cluster at {address}" if address else local, flush=True)
    import ray

    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address is None:
            ray.init(include_dashboard=False, **quiet)  # type: ignore[arg-type]  # no dashboard: half the memory
        else:
            ray.init(address=address, **quiet)  # type: ignore[arg-type]
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise HarnessError(f"cannot start or join {where}: {str(exc).splitlines()[0]}") from None
    _open.append(address)
    try:
        yield
    finally:
        _open.pop()
        ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT that nothing answers on is an error now (Ray would retry it for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # `auto`, or a ray:// client address: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise HarnessError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


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
