"""A study's hyperparameter search on Ray Tune, per category, scored on a validation split.

Trials never see the test split; the driver stores each trial's record as it ends, and the
best configuration is chosen among trials trained to their last epoch.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any

from msgspec.structs import replace

from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.models import get_model
from harness.record import RunRecord
from harness.spec import ExperimentSpec, SearchDim, run_spec, with_config
from harness.store import ResultsStore
from harness.sweep.cluster import run_device, worker_env
from harness.sweep.progress import Progress
from harness.sweep.tasks import MAX_RETRIES, stored_ok
from harness.sweep.worker import trial


def _tune_dim(dim: SearchDim) -> Any:
    from ray import tune

    if dim.values is not None:
        return tune.choice(dim.values)
    assert dim.low is not None
    assert dim.high is not None
    if dim.type == "randint":
        return tune.randint(int(dim.low), int(dim.high))
    return getattr(tune, dim.type)(dim.low, dim.high)


def searcher(spec: ExperimentSpec) -> Any:
    """Random search by default; Optuna (TPE) or HyperOpt when the spec names them. All seeded.

    A searcher whose package is missing is an error now (Ray's wrappers import, then fail on use).
    """
    seed = spec.seed_list()[0]
    if spec.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)
    if importlib.util.find_spec(spec.search) is None:
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


def max_epochs(spec: ExperimentSpec) -> int:
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
    spec: ExperimentSpec,
    category: str,
    store: ResultsStore,
    storage: str,
    progress: Progress,
    environment: str | None = None,
) -> dict[str, Any] | None:
    """One category's search in one of the spec's environments (None: the one it is in);
    returns how the best configuration was selected (None if none was)."""
    # Records go to the store; Tune's own loggers and console tables would only repeat them.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C stops the sweep: Tune would otherwise end the search early and carry on with it.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    from ray import tune

    # The scheduler decides where a trial's curve ends: a trial under another is another run.
    scheduler = {"scheduler": spec.scheduler.model_dump(mode="json")}
    seed = spec.seed_list()[0]
    base = run_spec(
        spec, category, seed, 0, run_device(spec), role="trial", selection=scheduler, environment=environment
    )
    done = {i: r.to_builtins() for i, r in stored_ok(store, spec.name, "trial", progress).items()}
    where = f"{category} in {environment}" if environment else category
    print(
        f"search {where}: {spec.num_samples} trials, {spec.search} search, {spec.scheduler.name} scheduler, "
        f"selected on {spec.metric} ({spec.validation.split} validation split, ratio {spec.validation.ratio:g})"
    )
    print(
        f"search {where}: Ray Tune is starting its trials (a new worker imports anomalib first); "
        "each trial is listed when it ends",
        flush=True,
    )

    finished: dict[str, RunRecord] = {}  # trials trained to their last epoch, by run id

    class StoreTrials(tune.Callback):  # the driver stores each trial as it ends
        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            if "record" not in result:
                return
            record = RunRecord.from_builtins(result["record"])
            if result.get("replayed"):
                progress.stored(record)
            else:
                if record.ok and not result["final"] and record.validation is not None:
                    record = replace(record, validation=replace(record.validation, stopped_early=True))
                store.put(record)
                progress.record(record)
            if record.ok and record.validation is not None and not record.validation.stopped_early:
                finished[record.run_id] = record  # a config sampled twice is one trial

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            progress.lose(f"trial {trial.trial_id}", _last_line(trial.error_file))

    trainable = tune.with_resources(
        tune.with_parameters(
            trial,
            base=base.model_dump_json(),
            done=done,
            env=worker_env(),
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
            search_alg=searcher(spec),
            scheduler=_scheduler(spec, max_epochs(spec)),
            max_concurrent_trials=spec.max_concurrent or None,
            reuse_actors=True,  # a new process per trial costs the anomalib import again
        ),
        run_config=tune.RunConfig(
            name="-".join(filter(None, (spec.name, environment, category))),
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
    candidates = [r for r in finished.values() if _finite(r.metrics.get(spec.metric))]
    print(
        f"search {where}: {len(grid)} trials, {len(finished)} trained to their last epoch, "
        f"{len(progress.failed)} failed, {len(grid.errors)} lost"
    )
    if not candidates:
        return None
    sign = 1 if spec.mode == "max" else -1
    # Ties go to the configuration that sorts first: the same in every environment (a run id
    # is not), so a winner changes only when the scores do.
    best = min(candidates, key=lambda r: (-sign * (r.metrics[spec.metric] or 0.0), stable_hash(r.config)))
    return {
        "metric": spec.metric,
        "mode": spec.mode,
        "value": best.metrics[spec.metric],
        "trial_run_id": best.run_id,
        "config": best.config,
        "n_trials": len(grid),
        "n_completed": len(finished),
        "search": spec.search,
        "scheduler": spec.scheduler.name,
        "validation": spec.validation.model_dump(mode="json"),
        "rule": f"{spec.mode} of last-epoch {spec.metric} among trials trained to their last epoch "
        "(ties: the configuration whose hash sorts first)",
    }
