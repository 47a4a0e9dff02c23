"""A study's runs as Ray tasks: grouped so fixed-backbone features are extracted once, sent
out as fast as the cluster takes them, retried when a worker or node is lost.

The store decides what is left to do: a run whose ``ok`` record is there is not run again,
so rerunning a killed sweep resumes it.
"""

from __future__ import annotations

from typing import Any

from harness.check.verify import verify
from harness.formatting import run_name
from harness.models import get_model
from harness.record import Role, RunRecord
from harness.spec import ExperimentSpec, RunSpec
from harness.store import ResultsStore
from harness.sweep.cluster import runtime_env, slots, task_options, worker_env
from harness.sweep.progress import Progress
from harness.sweep.worker import execute

MAX_RETRIES = 3  # system failures (a worker or node lost) are retried elsewhere this many times


def stored_ok(store: ResultsStore, sweep: str, role: Role, progress: Progress) -> dict[str, RunRecord]:
    """The sweep's finished runs of one role, by run id: what is not run again.

    A record whose hash or metrics are not its scores' is corrupt: its run goes again (said).
    """
    records = [r for r in store.records(sweep).values() if r.ok and r.role == role]
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


def run_grid(runs: list[RunSpec], spec: ExperimentSpec, store: ResultsStore, progress: Progress) -> None:
    """Run the specs as Ray tasks (see ``task_groups``); store each record as it comes back.

    When a task is lost with its worker or node, the run it was on is sent again alone (up to
    ``MAX_RETRIES`` times; then it is reported lost, and a rerun retries it) and the runs after
    it go on as a task of their own.
    """
    import ray
    from ray.exceptions import RayError, RayTaskError

    if not runs:
        return
    done = ray.put(frozenset(stored_ok(store, spec.name, runs[0].role, progress)))
    remote = ray.remote(execute)
    options = {"num_returns": "streaming", "max_retries": 0, "scheduling_strategy": "SPREAD", **task_options(spec)}
    env = worker_env()
    pending = [(group, 0) for group in reversed(task_groups(runs, spec, slots(spec)))]
    in_flight: dict[Any, tuple[list[RunSpec], set[int], int]] = {}  # task -> runs, returned, attempt
    limit = spec.max_concurrent or len(pending)

    while pending or in_flight:
        while pending and len(in_flight) < limit:
            group, attempt = pending.pop()
            task = remote.options(**options, **runtime_env(group[0].env_vars()))
            in_flight[task.remote([r.model_dump_json() for r in group], done, env)] = (group, set(), attempt)
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for gen in ready:
            group, returned, attempt = in_flight[gen]
            left = [r for i, r in enumerate(group) if i not in returned]
            stream: Any = gen  # an ObjectRefGenerator (ray.wait's annotation says ObjectRef)
            try:
                out: dict[str, Any] = ray.get(next(stream))
            except StopIteration:
                del in_flight[gen]
                for run in left:
                    progress.lose(run, "its task ended without it")  # never expected: every run yields
                continue
            except RayError as exc:
                del in_flight[gen]
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                if isinstance(exc, RayTaskError):  # the task's own code failed: again would too
                    for run in left:
                        progress.lose(run, why)
                    continue
                if attempt < MAX_RETRIES:  # the worker or node is gone: its run again, alone
                    pending.append(([left[0]], attempt + 1))
                    progress.event(f"retrying {run_name(left[0])} ({why})")
                else:
                    progress.lose(left[0], why)
                if left[1:]:
                    pending.append((left[1:], 0))
                continue
            if "note" in out:
                progress.event(out["note"])
                continue
            returned.add(out["index"])
            if out.get("skipped"):
                progress.stored(group[out["index"]])
                continue
            store.put(out["record"])
            progress.record(out["record"])
