"""A study's runs as Ray tasks: grouped so fixed-backbone features are extracted once, sent
out as fast as the cluster takes them, retried when a worker or node is lost.

The store decides what is left to do: a run whose ``ok`` record is there is not run again,
so rerunning a killed sweep resumes it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.check.verify import verify
from harness.formatting import run_name
from harness.models import get_model
from harness.record import Role, RunRecord
from harness.spec import ExperimentSpec, RunSpec
from harness.store import ResultsStore
from harness.sweep.claims import Claims
from harness.sweep.cluster import runtime_env, slots, task_options, worker_env
from harness.sweep.progress import Progress
from harness.sweep.worker import execute

MAX_RETRIES = 3  # system failures (a worker or node lost) are retried elsewhere this many times
POLL_S = 2.0  # how often the driver looks at the cluster's nodes and at runs another sweep has


def stored_ok(store: ResultsStore, sweep: str, role: Role, progress: Progress) -> dict[str, RunRecord]:
    """The sweep's finished runs of one role, by run id: what is not run again."""
    return verified_ok(store.records(sweep).values(), role, progress)


def verified_ok(found: Iterable[RunRecord | None], role: Role, progress: Progress) -> dict[str, RunRecord]:
    """The ``ok`` records of one role, by run id. A record whose hash or metrics are not its
    scores' is corrupt: its run goes again (said)."""
    records = [r for r in found if r is not None and r.ok and r.role == role]
    corrupt = verify(records)
    for i, why in sorted(corrupt.items()):
        progress.event(f"stored record of {run_name(records[i])} is corrupt ({why}): it runs again")
    return {r.run_id: r for i, r in enumerate(records) if i not in corrupt}


def task_groups(runs: list[RunSpec], spec: ExperimentSpec, n_slots: int) -> list[list[RunSpec]]:
    """Runs that go to one task: the seeds of a category and repeat when their features are the
    seed's to share (a fixed backbone), each run alone otherwise (spread over the cluster).

    Shared groups are split into chunks while there are fewer of them than ``n_slots`` (runs
    the cluster can hold at once), so a one-category study still fills the cluster; each chunk
    extracts the features once. Runs of different environments never share a task.
    """
    adapter = get_model(spec.model)
    if not runs or not adapter.shares_features(adapter.Args.model_validate(runs[0].model_args)):
        return [[r] for r in runs]
    by_key: dict[tuple[str | None, str, int], list[RunSpec]] = {}
    for r in runs:
        by_key.setdefault((r.environment_name, r.category, r.repeat), []).append(r)
    groups = list(by_key.values())
    chunks = max(1, -(-n_slots // len(groups)))  # per group, to reach `n_slots` tasks
    out: list[list[RunSpec]] = []
    for group in groups:
        k = min(chunks, len(group))
        out += [group[i::k] for i in range(k)]
    return out


def split_stored(
    runs: list[RunSpec], stored: dict[str, RunRecord], environments: dict[str | None, str | None]
) -> tuple[list[RunSpec], list[RunSpec]]:
    """(to run, already stored): a run is stored when its verified ``ok`` record is, with the
    id it gets in its variant's environment on this cluster (``environments``; an unknown one
    is left to the worker)."""
    from harness.run import make_run_id

    todo: list[RunSpec] = []
    done: list[RunSpec] = []
    for run in runs:
        env = environments.get(run.environment_name)
        (done if env is not None and make_run_id(run, env) in stored else todo).append(run)
    return todo, done


def environments_of(runs: list[RunSpec], spec: ExperimentSpec) -> dict[str | None, str | None]:
    """Per variant, the ``environment_id`` its runs get on this cluster: one probe each, in a
    worker started as the runs' will be, where they can run (the run id includes it)."""
    import ray

    from harness.sweep.worker import environment_of

    probe = ray.remote(environment_of)
    firsts = {run.environment_name: run for run in reversed(runs)}
    refs = {
        name: probe.options(**task_options(spec), **runtime_env(run.env_vars())).remote(
            run.model_dump_json(), worker_env()
        )
        for name, run in firsts.items()
    }
    out: dict[str | None, str | None] = {}
    for name, ref in refs.items():
        try:
            out[name] = ray.get(ref)
        except ray.exceptions.RayError:  # the runs will say what is wrong there; workers skip stored runs
            out[name] = None
    return out


@dataclass
class _Task:
    """Runs sent to Ray as one task, those it returned so far, and the node it runs on."""

    runs: list[RunSpec]
    attempt: int
    returned: set[int] = field(default_factory=set)
    node: str | None = None

    def left(self) -> list[RunSpec]:
        return [r for i, r in enumerate(self.runs) if i not in self.returned]


@dataclass
class _Grid:
    """One ``run_grid``: what waits to be sent, what is out on Ray, what another sweep has."""

    spec: ExperimentSpec
    store: ResultsStore
    progress: Progress
    role: Role
    claims: Claims
    environments: dict[str | None, str | None]  # see environments_of
    stored: dict[str, RunRecord] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)  # record files read so far
    pending: list[tuple[list[RunSpec], int]] = field(default_factory=list)  # groups to send, attempt
    in_flight: dict[Any, _Task] = field(default_factory=dict)
    done: Any = None  # the stored run ids, in Ray's object store, for the workers
    waiting: list[RunSpec] = field(default_factory=list)  # claimed by another live sweep

    def __post_init__(self) -> None:
        self.seen = set(self.store.relpaths(self.spec.name))
        self.stored = stored_ok(self.store, self.spec.name, self.role, self.progress)

    def plan(self, runs: list[RunSpec]) -> None:
        """Claim what is not stored; what another sweep holds is waited for, not computed."""
        import ray

        todo, done = split_stored(runs, self.stored, self.environments)
        self.done = ray.put(frozenset(self.stored))
        for run in done:
            self.progress.stored(run)
        mine: list[RunSpec] = []
        for run in todo:
            if self.claims.take(run):
                mine.append(run)
            else:
                self.waiting.append(run)
                holder = self.claims.holder(run)
                self.progress.event(f"{run_name(run)} is being run by another sweep ({holder}): waiting")
        self.pending += [(group, 0) for group in reversed(task_groups(mine, self.spec, slots(self.spec)))]

    def recheck_waiting(self) -> None:
        """Runs another sweep was computing: stored now (counted), or its claim is gone (ours)."""
        freed = {i for i, run in enumerate(self.waiting) if self.claims.holder(run) is None}
        if not freed:
            return
        runs = [run for i, run in enumerate(self.waiting) if i in freed]
        self.waiting = [run for i, run in enumerate(self.waiting) if i not in freed]
        self.stored.update(self.new_records())
        self.plan(runs)

    def new_records(self) -> dict[str, RunRecord]:
        """Verified ``ok`` records of this role stored since the last read (by another sweep)."""
        names = [n for n in self.store.relpaths(self.spec.name) if n not in self.seen]
        self.seen.update(names)
        return verified_ok((self.store.get(self.spec.name, Path(n).stem) for n in names), self.role, self.progress)

    def lost_nodes(self, dead: set[str]) -> None:
        """Tasks on a node Ray declared dead go again now, not when Ray's own connection to
        the node gives up (minutes, when the node's link is cut)."""
        import ray

        for ref, task in list(self.in_flight.items()):
            if task.node in dead:
                del self.in_flight[ref]
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
                self.retry(task, f"node {str(task.node)[:8]} was declared dead")

    def retry(self, task: _Task, why: str) -> None:
        """The run a lost task was on goes again alone (up to ``MAX_RETRIES``); the runs after
        it go on as a task of their own."""
        left = task.left()
        if not left:
            return
        if task.attempt < MAX_RETRIES:
            self.pending.append(([left[0]], task.attempt + 1))
            self.progress.event(f"retrying {run_name(left[0])} ({why})")
        else:
            self.lose([left[0]], why)
        if left[1:]:
            self.pending.append((left[1:], 0))

    def lose(self, runs: list[RunSpec], why: str) -> None:
        for run in runs:
            self.claims.release(run)
            self.progress.lose(run, why)

    def store_record(self, record: RunRecord, run: RunSpec) -> None:
        self.store.put(record)
        self.seen.add(f"{self.spec.name}/runs/{record.run_id}.json")
        self.claims.release(run)
        self.progress.record(record)


def run_grid(runs: list[RunSpec], spec: ExperimentSpec, store: ResultsStore, progress: Progress) -> None:
    """Run the specs as Ray tasks (see ``task_groups``); store each record as it comes back.

    Runs stored already are left out before anything goes to Ray, and runs that another live
    sweep of the same store is computing are waited for (``Claims``). When a task is lost
    with its worker or node (Ray says so, or declares the node it ran on dead), the run it was
    on goes again (``_Grid.retry``; after ``MAX_RETRIES`` it is reported lost, and a rerun
    retries it).
    """
    import ray
    from ray.exceptions import RayError, RayTaskError

    if not runs:
        return
    claims = Claims(store.root / spec.name / "claims")
    grid = _Grid(spec, store, progress, runs[0].role, claims, environments_of(runs, spec))
    remote = ray.remote(execute)
    options = {"num_returns": "streaming", "max_retries": 0, "scheduling_strategy": "SPREAD", **task_options(spec)}
    env = worker_env()
    try:
        grid.plan(runs)
        looked = time.monotonic()
        while grid.pending or grid.in_flight or grid.waiting:
            grid.claims.renew()
            limit = spec.max_concurrent or len(grid.pending) + len(grid.in_flight)
            while grid.pending and len(grid.in_flight) < limit:
                group, attempt = grid.pending.pop()
                fn = remote.options(**options, **runtime_env(group[0].env_vars()))
                grid.in_flight[fn.remote([r.model_dump_json() for r in group], grid.done, env)] = _Task(group, attempt)
            if time.monotonic() - looked >= POLL_S:
                looked = time.monotonic()
                grid.lost_nodes({n["NodeID"] for n in ray.nodes() if not n["Alive"]})
                grid.recheck_waiting()
            if not grid.in_flight:
                time.sleep(POLL_S)
                continue
            ready, _ = ray.wait(list(grid.in_flight), num_returns=1, timeout=POLL_S)
            if not ready:
                continue
            gen = ready[0]
            task = grid.in_flight[gen]
            stream: Any = gen  # an ObjectRefGenerator (ray.wait's annotation says ObjectRef)
            try:
                out: dict[str, Any] = ray.get(next(stream))
            except StopIteration:
                del grid.in_flight[gen]
                grid.lose(task.left(), "its task ended without it")  # never expected: every run yields
                continue
            except RayError as exc:
                del grid.in_flight[gen]
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                if isinstance(exc, RayTaskError):  # the task's own code failed: again would too
                    grid.lose(task.left(), why)
                else:  # the worker or node is gone
                    grid.retry(task, why)
                continue
            if "node" in out:
                task.node = out["node"]
            elif "note" in out:
                progress.event(out["note"])
            elif out.get("skipped"):
                task.returned.add(out["index"])
                grid.claims.release(task.runs[out["index"]])
                progress.stored(task.runs[out["index"]])
            else:
                task.returned.add(out["index"])
                grid.store_record(out["record"], task.runs[out["index"]])
    finally:
        grid.claims.release_all()
