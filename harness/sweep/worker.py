"""What runs on a Ray worker: a task's runs in turn, or one Tune trial.

Workers run ``run_one`` (the code of ``harness run``) and hand their records back to the
driver, which alone writes the store. Besides records, a task says what it is doing when that
takes seconds with nothing to show (importing anomalib, extracting shared features).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from msgspec.structs import replace

from harness.errors import HarnessError
from harness.malloc import set_mmap_threshold
from harness.models import get_model
from harness.record import RunRecord
from harness.spec import RunSpec

# A worker's first run imports anomalib and Lightning (about 8 s): said before it starts.
_HEAVY_IMPORT = "anomalib.engine"


def worker_setup(env: dict[str, str]) -> None:
    os.environ.update(env)
    # Only the driver talks to W&B: a key that came with the job's environment leaves here.
    os.environ.pop("WANDB_API_KEY", None)
    os.environ.setdefault("TQDM_DISABLE", "1")
    set_mmap_threshold()


def probe_environment(requested: dict[str, Any]) -> str | None:
    """Why this worker cannot run a variant that asks for ``requested`` (None: it can)."""
    from harness.fingerprint import check_requested

    try:
        check_requested(requested)
    except HarnessError as exc:
        return str(exc)
    return None


def environment_of(spec_json: str, env: dict[str, str]) -> str | None:
    """The ``environment_id`` a run gets in a worker started as this one (None: it cannot say,
    say a device it does not see): the driver resumes by it, before sending runs out."""
    worker_setup(env)
    from harness.run import run_environment_id

    try:
        return run_environment_id(RunSpec.model_validate_json(spec_json))
    except HarnessError:
        return None


def node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def error_text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, HarnessError) else f"{type(exc).__name__}: {exc}"


def execute(spec_jsons: list[str], done: frozenset[str], env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A Ray task (a streaming generator): its runs in turn, each record yielded when done.

    A task's runs are one run, or a seed study's runs of one category whose features do not
    depend on the seed: the first extracts them, the others reuse them (``run_one``'s cache).
    The driver sends no run it knows is stored; on a cluster of unlike nodes a run may be
    stored in this node's environment though, and is skipped (its id is in ``done``).
    Yields ``{"node"}`` first (the driver retries a dead node's runs), then
    ``{"index", "record"}`` or ``{"index", "skipped"}`` per run, or ``{"note"}`` (what the
    worker is busy with).
    """
    worker_setup(env)
    yield {"node": node_id()}
    if _HEAVY_IMPORT not in sys.modules:
        yield {"note": f"worker {os.getpid()} on node {node_id()[:8]} is importing anomalib (its first run)"}
    from harness.run import FeatureCache, planned_run_id, run_one, unstarted_record

    cache: FeatureCache = {}  # this task's features: one category's, freed when it ends
    specs = [RunSpec.model_validate_json(s) for s in spec_jsons]
    if len(specs) > 1:
        first = specs[0]
        yield {
            "note": f"{first.model} {first.category} r{first.repeat}: extracting training features once "
            f"for {len(specs)} seeds (then each trains on them)"
        }
    for index, spec in enumerate(specs):
        try:
            if planned_run_id(spec) in done:
                yield {"index": index, "skipped": True}
                continue
            record = run_one(spec, cache=cache)
        except Exception as exc:  # could not start here (data missing on this node) or broke outside the run
            record = unstarted_record(spec, error_text(exc))
        yield {"index": index, "record": replace(record, node_id=node_id())}


def trial_spec(base: RunSpec, config: dict[str, Any]) -> RunSpec:
    """A trial's run: the base trial with the sampled values (dotted spec keys) applied."""
    doc = base.model_dump(mode="json")
    for key, value in config.items():
        section, name = key.split(".", 1)
        doc[section] = {**doc[section], name: value}
    doc["selection"] = {**(base.selection or {}), "config": dict(sorted(config.items()))}
    return RunSpec.model_validate(doc)


def trial(
    config: dict[str, Any], base: str, done: dict[str, dict[str, Any]], env: dict[str, str], metric: str, worst: float
) -> None:
    """A Ray Tune trainable: one trial, reporting its validation metrics after each epoch.

    A trial already stored (a resumed search) is replayed from its record, not retrained.
    Records cross Tune as plain dicts (its results must be), typed again by the driver.
    """
    worker_setup(env)
    # Tune runs a trial inside its log folder; relative data paths mean the worker's own folder.
    os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
    import ray
    from ray import tune

    from harness.run import planned_run_id, run_one, unstarted_record

    spec = trial_spec(RunSpec.model_validate_json(base), config)
    adapter = get_model(spec.model)
    epochs = adapter.max_epochs(adapter.Args.model_validate(spec.model_args))

    def report(record: RunRecord, epoch: int, final: bool, replayed: bool = False) -> None:
        rec = record if replayed else replace(record, node_id=node_id())
        point = rec.validation.curve[epoch - 1] if epoch and rec.validation else {}
        metrics = {k: v for k, v in point.items() if v is not None}
        # Tune wants the metric in every result: a failed or unscored trial ranks last.
        tune.report({metric: worst, **metrics, "record": rec.to_builtins(), "final": final, "replayed": replayed})

    # A variant that torch must see when it loads runs in a task started with it (see
    # ``_in_environment``), which also works out the run id there: it depends on the variant.
    stream = _in_environment(spec, env, frozenset(done)) if spec.env_vars() else None
    run_id = ray.get(next(stream))["run_id"] if stream is not None else planned_run_id(spec)

    # A stored trial, stopped early or not, is finished: the scheduler sees its curve again.
    stored = done.get(run_id)
    if stored is not None:
        record = RunRecord.from_builtins(stored)
        info = record.validation
        curve = info.curve if info else []
        for i in range(1, len(curve) + 1):
            report(record, i, final=i == len(curve) and not (info and info.stopped_early), replayed=True)
        return

    def on_epoch(record: RunRecord) -> None:
        n = len(record.validation.curve) if record.validation else 0
        if n < epochs:  # the last epoch is reported below, with the finished record
            report(record, n, final=False)

    if stream is not None:
        record = _follow(stream, on_epoch)
    else:
        try:
            record = run_one(spec, on_epoch=on_epoch)
        except Exception as exc:  # could not start here (data missing on this node) or broke outside the run
            record = unstarted_record(spec, error_text(exc))
    report(record, len(record.validation.curve) if record.validation else 0, final=True)


def streamed_run(spec_json: str, env: dict[str, str], done: frozenset[str]) -> Iterator[dict[str, Any]]:
    """A Ray task (a streaming generator): one trial's run id (``{"run_id"}``), then, unless
    that is in ``done``, each epoch's record as it is scored (``{"epoch": record}``) and the
    finished one (``{"final": record}``)."""
    worker_setup(env)
    from harness.run import planned_run_id, run_one, unstarted_record

    spec = RunSpec.model_validate_json(spec_json)
    run_id = planned_run_id(spec)
    yield {"run_id": run_id}
    if run_id in done:
        return
    out: queue.Queue[tuple[str, RunRecord]] = queue.Queue()

    def work() -> None:
        try:
            out.put(("final", run_one(spec, on_epoch=lambda r: out.put(("epoch", r)))))
        except Exception as exc:
            out.put(("final", unstarted_record(spec, error_text(exc))))

    threading.Thread(target=work, daemon=True).start()  # as Tune runs a trial: off the main thread
    while True:
        kind, record = out.get()
        yield {kind: record.to_builtins()}
        if kind == "final":
            return


def _in_environment(spec: RunSpec, env: dict[str, str], done: frozenset[str]) -> Any:
    """Start a trial's run in a worker started with its environment's variables, on this node;
    returns the stream of ``streamed_run``.

    Tune starts its trial actors with a runtime environment of its own, so a variant that
    torch must see when it loads runs in a task beside the actor, on the CPUs (and GPUs) the
    actor holds.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from harness.sweep.cluster import runtime_env

    gpus = [str(g) for g in ray.get_gpu_ids()]
    env_vars = spec.env_vars() | ({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})
    task = ray.remote(streamed_run).options(
        num_cpus=0,
        num_returns="streaming",
        max_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id(), soft=False),
        **runtime_env(env_vars),
    )
    return task.remote(spec.model_dump_json(), env, done)


def _follow(stream: Any, on_epoch: Callable[[RunRecord], None]) -> RunRecord:
    """The finished record from a ``streamed_run``, each epoch's handed to ``on_epoch`` on the
    way; a trial the scheduler stops takes the task with it."""
    import ray

    try:
        for ref in stream:
            out = ray.get(ref)
            if "final" in out:
                return RunRecord.from_builtins(out["final"])
            on_epoch(RunRecord.from_builtins(out["epoch"]))
    finally:
        ray.cancel(stream, force=True)
    raise HarnessError("the trial's run ended without a record")
