"""The sweep driver: a study's runs on Ray. The only module that imports Ray.

Workers run ``run_one`` (the code of ``harness run``) and hand their records back to the
driver, which alone writes the store: a cluster needs no shared file system, and a run is
stored exactly once however often Ray retried it. The store decides what is left to do: a
run whose ``ok`` record is there is not run again, so rerunning a killed sweep resumes it.

- ``study: seeds``: categories x seeds x repeats as Ray tasks, retried on lost nodes.
- ``study: hpo``: per category a Ray Tune search scored on a validation split carved from
  the training images, then the best configuration's runs on the test split, with the
  spec's seeds and repeats.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from harness.datasets import check_data
from harness.errors import HarnessError
from harness.models import get_model
from harness.spec import (
    Device,
    ExperimentSpec,
    RunSpec,
    SearchDim,
    config_label,
    expand,
    run_spec,
    with_config,
)
from harness.store import ResultsStore
from harness.tracking import open_tracker

# Passed from the driver to every worker: on a cluster, workers do not inherit its shell.
PASS_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME", "CUBLAS_WORKSPACE_CONFIG")
# glibc's M_MMAP_THRESHOLD: what MALLOC_MMAP_THRESHOLD_ sets at process start (see cli.py).
# Ray starts workers itself, so each worker sets it before its first run.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 20
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# System failures (a worker or node lost) are retried elsewhere this many times.
MAX_RETRIES = 3


def _worker_setup(env: dict[str, str]) -> None:
    os.environ.update(env)
    # Only the driver talks to W&B: a key that came with the job's environment leaves here.
    os.environ.pop("WANDB_API_KEY", None)
    os.environ.setdefault("TQDM_DISABLE", "1")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _execute(spec_jsons: list[str], done: frozenset[str], env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A Ray task (a streaming generator): its runs in turn, each record yielded when done.

    A task's runs are one run, or a seed study's runs of one category whose features do not
    depend on the seed: the first extracts them, the others reuse them (``run_one``'s cache).
    A run whose ``ok`` record is already stored is skipped.
    """
    _worker_setup(env)
    from harness.run import FeatureCache, planned_run_id, run_one, unstarted_record

    cache: FeatureCache = {}  # this task's features: one category's, freed when it ends
    for index, spec_json in enumerate(spec_jsons):
        spec = RunSpec.model_validate_json(spec_json)
        try:
            if planned_run_id(spec) in done:
                yield {"index": index, "skipped": True}
                continue
            record = run_one(spec, cache=cache)
        except Exception as exc:  # could not start here (data missing on this node) or broke outside the run
            record = unstarted_record(spec, _error(exc))
        yield {"index": index, "record": record.model_copy(update={"node_id": _node_id()}).to_json()}


def _error(exc: Exception) -> str:
    return str(exc) if isinstance(exc, HarnessError) else f"{type(exc).__name__}: {exc}"


def _trial(
    config: dict[str, Any], base: str, done: dict[str, dict[str, Any]], env: dict[str, str], metric: str, worst: float
) -> None:
    """A Ray Tune trainable: one trial, reporting its validation metrics after each epoch.

    A trial already stored (a resumed search) is replayed from its record, not retrained.
    """
    _worker_setup(env)
    # Tune runs a trial inside its log folder; relative data paths mean the worker's own folder.
    os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
    from ray import tune

    from harness.record import RunRecord
    from harness.run import planned_run_id, run_one, unstarted_record

    spec = RunSpec.model_validate_json(base)
    spec = trial_spec(spec, config)
    adapter = get_model(spec.model)
    epochs = adapter.max_epochs(adapter.Args.model_validate(spec.model_args))

    def report(record: RunRecord, epoch: int, final: bool, replayed: bool = False) -> None:
        rec = record.to_json() if replayed else record.model_copy(update={"node_id": _node_id()}).to_json()
        point = rec["validation"]["curve"][epoch - 1] if epoch else {}
        metrics = {k: v for k, v in point.items() if v is not None}
        # Tune wants the metric in every result: a failed or unscored trial ranks last.
        tune.report({metric: worst, **metrics, "record": rec, "final": final, "replayed": replayed})

    # A stored trial, stopped early or not, is finished: the scheduler sees its curve again.
    stored = done.get(planned_run_id(spec))
    if stored is not None:
        record = RunRecord.from_json(stored)
        info = record.validation
        curve = info.curve if info else []
        for i in range(1, len(curve) + 1):
            report(record, i, final=i == len(curve) and not (info and info.stopped_early), replayed=True)
        return

    def on_epoch(record: RunRecord) -> None:
        n = len(record.validation.curve)  # type: ignore[union-attr]
        if n < epochs:  # the last epoch is reported below, with the finished record
            report(record, n, final=False)

    try:
        record = run_one(spec, on_epoch=on_epoch)
    except Exception as exc:  # could not start here (data missing on this node) or broke outside the run
        record = unstarted_record(spec, _error(exc))
    report(record, len(record.validation.curve) if record.validation else 0, final=True)


def trial_spec(base: RunSpec, config: dict[str, Any]) -> RunSpec:
    """A trial's run: the base trial with the sampled values (dotted spec keys) applied."""
    doc = base.model_dump(mode="json")
    for key, value in config.items():
        section, name = key.split(".", 1)
        doc[section] = {**doc[section], name: value}
    doc["selection"] = {**(base.selection or {}), "config": dict(sorted(config.items()))}
    return RunSpec.model_validate(doc)


@dataclass
class Progress:
    """Live progress on stdout: runs done / failed / total and an ETA, one line per event."""

    total: int
    out: TextIO = sys.stdout
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: int = 0
    lost: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.ok + len(self.failed) + self.skipped + len(self.lost)

    def eta(self) -> str:
        ran = self.ok + len(self.failed) + len(self.lost)
        left = self.total - self.finished
        if not ran or not left:
            return "-" if left else "0s"
        secs = (time.monotonic() - self.started) / ran * left
        return f"{int(secs // 60)}m{int(secs % 60):02d}s"

    def event(self, what: str) -> None:
        counts = f"{self.finished}/{self.total} done, {len(self.failed)} failed, {self.skipped} already stored"
        print(f"[{counts}, eta {self.eta()}] {what}", file=self.out, flush=True)

    def record(self, record: dict[str, Any]) -> None:
        name = describe(record)
        if record["status"] == "ok":
            self.ok += 1
            metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(record["metrics"].items()) if v is not None)
            self.event(f"ok {name} {metrics} ({record['timing']['total_s']:.1f}s)")
        else:
            self.failed.append(f"{name}: {(record['error'] or '').splitlines()[0]}")
            self.event(f"FAILED {self.failed[-1]}")


def describe(record: dict[str, Any] | RunSpec) -> str:
    """``ganomaly disc seed=0 r0`` (plus the sampled values for a trial)."""
    get = record.get if isinstance(record, dict) else lambda k: getattr(record, k)
    name = f"{get('model')} {get('category')} seed={get('seed')} r{get('repeat')}"
    if get("role") == "trial":
        config = (get("selection") or {}).get("config", {})
        name += " trial " + config_label(config)
    return name


def _ray_defaults(address: str | None) -> None:
    """No usage stats; and the embedded default is this machine only: on loopback, reachable
    from no other host, with Ray's token auth.

    Ray resolves 127.0.0.1 to the routable address unless "clusters" are off, its switch for
    single-machine Ray (named for Windows and macOS), read when Ray is first imported. Token
    auth is Ray's default for a local cluster; saying so explicitly spares every sweep Ray's
    warning that it chose it.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        os.environ.setdefault(LOOPBACK_ENV, "0")
        os.environ.setdefault("RAY_AUTH_MODE", "token")


# The addresses of the clusters `cluster` holds open in this process (None: a local one).
_open: list[str | None] = []


@contextlib.contextmanager
def cluster(address: str | None) -> Iterator[None]:
    """Join the cluster at ``address`` (``auto`` inside ``ray job submit``), or start a local one.

    Inside an open ``cluster`` of the same address, it is that one (the demo runs its two
    studies on one local cluster); another address is an error, as Ray allows one per process.
    """
    if _open:
        if _open[-1] != address:
            held = _open[-1] or "a local Ray cluster"
            raise HarnessError(f"this process already holds {held}; it cannot also join {address or 'a local one'}")
        yield
        return
    _ray_defaults(address)
    if address is not None:
        _check_reachable(address)
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


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
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


def _device(spec: ExperimentSpec) -> Device:
    """A run uses the GPU Ray gave it, and no GPU when it asked for none.

    Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` alone for zero-GPU tasks: "auto" would take a GPU
    nobody reserved.
    """
    return "cuda" if spec.resources.gpu > 0 else "cpu"


def _options(spec: ExperimentSpec) -> dict[str, Any]:
    return {"num_cpus": spec.resources.cpu, "num_gpus": spec.resources.gpu}


def _worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in PASS_ENV if k in os.environ}


def _stored_ok(store: ResultsStore, sweep: str, role: str) -> dict[str, dict[str, Any]]:
    """The sweep's finished runs of one role, by run id: what is not run again."""
    records = store.records(sweep)
    return {i: r for i, r in records.items() if r.get("status") == "ok" and r.get("role", "run") == role}


def task_groups(runs: list[RunSpec], spec: ExperimentSpec, slots: int) -> list[list[RunSpec]]:
    """Runs that go to one task: the seeds of a category and repeat when their features are the
    seed's to share (a fixed backbone), each run alone otherwise (spread over the cluster).

    Shared groups are split into chunks while there are fewer of them than ``slots`` (runs the
    cluster can hold at once), so a one-category study still fills the cluster; each chunk
    extracts the features once.
    """
    adapter = get_model(spec.model)
    if not runs or not adapter.shares_features(adapter.Args.model_validate(runs[0].model_args)):
        return [[r] for r in runs]
    by_key: dict[tuple[str, int], list[RunSpec]] = {}
    for r in runs:
        by_key.setdefault((r.category, r.repeat), []).append(r)
    groups = list(by_key.values())
    chunks = max(1, -(-slots // len(groups)))  # per group, to reach `slots` tasks
    out: list[list[RunSpec]] = []
    for group in groups:
        k = min(chunks, len(group))
        out += [group[i::k] for i in range(k)]
    return out


def _slots(spec: ExperimentSpec) -> int:
    """How many of the spec's runs the cluster can hold at once."""
    import ray

    total = ray.cluster_resources()
    fits = [
        int(total.get(name, 0) // want)
        for name, want in (("CPU", spec.resources.cpu), ("GPU", spec.resources.gpu))
        if want
    ]
    slots = max(1, min(fits)) if fits else 1
    return min(slots, spec.max_concurrent) if spec.max_concurrent else slots


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
    done = ray.put(frozenset(_stored_ok(store, spec.name, runs[0].role)))
    task = ray.remote(_execute).options(
        num_returns="streaming", max_retries=0, scheduling_strategy="SPREAD", **_options(spec)
    )
    env = _worker_env()
    pending = [(group, 0) for group in reversed(task_groups(runs, spec, _slots(spec)))]
    in_flight: dict[Any, tuple[list[RunSpec], set[int], int]] = {}  # task -> runs, returned, attempt
    limit = spec.max_concurrent or len(pending)

    def lose(lost: list[RunSpec], why: str) -> None:
        for run in lost:
            progress.lost.append(f"{describe(run)}: {why}")
            progress.event(f"LOST {progress.lost[-1]}")

    while pending or in_flight:
        while pending and len(in_flight) < limit:
            group, attempt = pending.pop()
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
                lose(left, "its task ended without it")  # never expected: every run yields
                continue
            except RayError as exc:
                del in_flight[gen]
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                if isinstance(exc, RayTaskError):  # the task's own code failed: again would too
                    lose(left, why)
                    continue
                if attempt < MAX_RETRIES:  # the worker or node is gone: its run again, alone
                    pending.append(([left[0]], attempt + 1))
                    progress.event(f"retrying {describe(left[0])} ({why})")
                else:
                    lose(left[:1], why)
                if left[1:]:
                    pending.append((left[1:], 0))
                continue
            returned.add(out["index"])
            if out.get("skipped"):
                progress.skipped += 1
                progress.event(f"already stored {describe(group[out['index']])}")
                continue
            store.put(out["record"])
            progress.record(out["record"])


def _tune_dim(dim: SearchDim) -> Any:
    from ray import tune

    if dim.values is not None:
        return tune.choice(dim.values)
    assert dim.low is not None
    assert dim.high is not None
    if dim.type == "randint":
        return tune.randint(int(dim.low), int(dim.high))
    return getattr(tune, dim.type)(dim.low, dim.high)


def _searcher(spec: ExperimentSpec) -> Any:
    """Random search by default; Optuna (TPE) or HyperOpt when the spec names them. All seeded."""
    seed = spec.seeds[0]
    if spec.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)
    if importlib.util.find_spec(spec.search) is None:  # Ray's wrappers import, then fail on use
        raise HarnessError(f"search: {spec.search} needs its package (pip install {spec.search})")
    if spec.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return OptunaSearch(seed=seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=seed)


def _scheduler(spec: ExperimentSpec, max_t: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        max_t=max_t,
        grace_period=min(spec.scheduler.grace_period, max_t),
        reduction_factor=spec.scheduler.reduction_factor,
    )


def _max_epochs(spec: ExperimentSpec) -> int:
    """The most epochs any trial can train: ASHA's last rung."""
    adapter = get_model(spec.model)
    dims = spec.search_space or {}
    corners: list[dict[str, Any]] = [{}] + [{k: v} for k, d in dims.items() for v in d.corners()]
    return max(adapter.max_epochs(adapter.Args.model_validate(with_config(spec, c).model_args)) for c in corners)


def _last_line(path: str | None) -> str:
    """The exception line of a Tune error file (its traceback is in the file)."""
    try:
        lines = [ln for ln in Path(path or "").read_text().splitlines() if ln.strip()]
    except OSError:
        return f"see {path}"
    return lines[-1] if lines else f"see {path}"


def _finite(value: Any) -> bool:
    return isinstance(value, float | int) and math.isfinite(value)


def search(
    spec: ExperimentSpec, category: str, store: ResultsStore, storage: str, progress: Progress
) -> dict[str, Any] | None:
    """One category's search; returns how the best configuration was selected (None if none was)."""
    # Records go to the store; Tune's own loggers and console tables would only repeat them.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C stops the sweep: Tune would otherwise end the search early and carry on with it.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    from ray import tune

    # The scheduler decides where a trial's curve ends: a trial under another is another run.
    scheduler = {"scheduler": spec.scheduler.model_dump(mode="json")}
    base = run_spec(spec, category, spec.seeds[0], 0, _device(spec), role="trial", selection=scheduler)
    done = _stored_ok(store, spec.name, "trial")
    print(
        f"search {category}: {spec.num_samples} trials, {spec.search} search, {spec.scheduler.name} scheduler, "
        f"selected on {spec.metric} ({spec.validation.split} validation split, ratio {spec.validation.ratio:g})"
    )

    finished: dict[str, dict[str, Any]] = {}  # trials trained to their last epoch, by run id

    class StoreTrials(tune.Callback):  # the driver stores each trial as it ends
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            if "record" not in result:
                return
            record = result["record"]
            if result.get("replayed"):
                progress.skipped += 1
                progress.event(f"already stored {describe(record)}")
            else:
                if record["status"] == "ok" and not result["final"]:
                    record["validation"]["stopped_early"] = True
                store.put(record)
                progress.record(record)
            if record["status"] == "ok" and not record["validation"]["stopped_early"]:
                finished[record["run_id"]] = record  # a config sampled twice is one trial

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            progress.lost.append(f"trial {trial.trial_id}: {_last_line(trial.error_file)}")
            progress.event(f"LOST {progress.lost[-1]}")

    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            base=base.model_dump_json(),
            done=done,
            env=_worker_env(),
            metric=spec.metric,
            worst=-math.inf if spec.mode == "max" else math.inf,
        ),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={k: _tune_dim(d) for k, d in (spec.search_space or {}).items()},
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            search_alg=_searcher(spec),
            scheduler=_scheduler(spec, _max_epochs(spec)),
            max_concurrent_trials=spec.max_concurrent or None,
            reuse_actors=True,  # a new process per trial costs the anomalib import again
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{category}",
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=MAX_RETRIES),
            callbacks=[StoreTrials()],
            verbose=0,
        ),
    )
    # Lost trials are reported above, once; Tune would log each with its traceback, and
    # complain that the logs it was told not to write are missing.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    grid = tuner.fit()
    # fit() returns normally when trials failed: their errors are in the grid (and counted as lost).
    candidates = [r for r in finished.values() if _finite(r["metrics"].get(spec.metric))]
    print(
        f"search {category}: {len(grid)} trials, {len(finished)} trained to their last epoch, "
        f"{len(progress.failed)} failed, {len(grid.errors)} lost"
    )
    if not candidates:
        return None
    sign = 1 if spec.mode == "max" else -1
    best = max(candidates, key=lambda r: (sign * r["metrics"][spec.metric], r["run_id"]))
    return {
        "metric": spec.metric,
        "mode": spec.mode,
        "value": best["metrics"][spec.metric],
        "trial_run_id": best["run_id"],
        "config": best["selection"]["config"],
        "n_trials": len(grid),
        "n_completed": len(finished),
        "search": spec.search,
        "scheduler": spec.scheduler.name,
        "validation": spec.validation.model_dump(mode="json"),
        "rule": f"{spec.mode} of last-epoch {spec.metric} among trials trained to their last epoch",
    }


@dataclass
class SweepResult:
    ok: int
    failed: list[str]
    skipped: int
    lost: list[str]

    @property
    def clean(self) -> bool:
        return not (self.failed or self.lost)

    def summary(self, name: str) -> list[str]:
        """The lines ``harness sweep`` ends with: counts, then each run that failed or was lost."""
        return [
            f"sweep {name}: {self.ok} ok, {len(self.failed)} failed, {len(self.lost)} lost, "
            f"{self.skipped} already stored",
            *(f"  failed: {line}" for line in self.failed),
            *(f"  lost (not stored; rerun the sweep to retry): {line}" for line in self.lost),
        ]

    def add(self, progress: Progress) -> None:
        self.ok += progress.ok
        self.failed += progress.failed
        self.skipped += progress.skipped
        self.lost += progress.lost


def preflight(spec: ExperimentSpec, address: str | None) -> None:
    """Checks that need no cluster: data where the driver can see it, the metric, the searcher."""
    if spec.study == "hpo" and spec.metric.startswith("val_pixel") and not get_model(spec.model).anomaly_maps:
        raise HarnessError(f"metric: {spec.model} makes no anomaly maps; use val_image_AUROC or val_image_F1Max")
    root = Path(spec.data.root).expanduser()
    # On a cluster the data may live on the workers only: they check it there.
    if address is None or root.exists():
        for category in spec.data.categories:
            check_data(spec.data, category)
    if spec.study == "hpo":
        _searcher(spec)


def sweep(spec: ExperimentSpec, results: Path, address: str | None = None) -> SweepResult:
    """Run a whole study; records land in ``results/<name>/runs/``."""
    _ray_defaults(address)  # before preflight, which may import Ray Tune
    store = ResultsStore(results)
    store.check_writable()
    preflight(spec, address)
    tally = SweepResult(0, [], 0, [])

    def run(runs: list[RunSpec]) -> None:
        progress = Progress(len(runs))
        run_grid(runs, spec, store, progress)
        tally.add(progress)

    tracker = open_tracker(spec, results)  # online without a key fails here, before any run
    if tracker is not None:
        tracker.attach(store)
    try:
        with cluster(address):
            check_resources(spec)
            if spec.study == "seeds":
                run(expand(spec, _device(spec)))
            else:
                searches(spec, store, results, tally, run)
        if tracker is not None:
            tracker.finish(store)
    finally:
        if tracker is not None:
            tracker.close()
    return tally


def searches(
    spec: ExperimentSpec, store: ResultsStore, results: Path, tally: SweepResult, run: Callable[[list[RunSpec]], None]
) -> None:
    """Per category: the search, then its best configuration's runs on the test split."""
    storage = spec.tune_storage or str(Path(results).resolve() / spec.name / "tune")
    for category in spec.data.categories:
        trials = Progress(spec.num_samples)
        selection = search(spec, category, store, storage, trials)
        tally.add(trials)
        if selection is None:
            tally.failed.append(f"{category}: no trial finished; nothing to select")
            continue
        print(
            f"best {category}: {selection['config']} {spec.metric}={selection['value']:.4f}; "
            f"its runs on the test split:"
        )
        best = with_config(spec, selection["config"])
        run([r for r in expand(best, _device(spec), role="best", selection=selection) if r.category == category])
