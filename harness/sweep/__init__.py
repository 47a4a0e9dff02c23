"""The sweep driver: a study's runs on Ray. The only package that imports Ray.

Workers hand their records back to the driver, which alone writes the store: a cluster needs
no shared file system, and a run is stored exactly once however often Ray retried it.

- ``cluster``: start or join a cluster, check what it can hold;
- ``tasks``: ``study: seeds``, categories x seeds x repeats as Ray tasks, retried on lost nodes;
- ``rounds``: an adaptive seed study, its rounds of seeds decided from the stored records;
- ``search``: ``study: hpo``, per category a Ray Tune search on a validation split;
- ``worker``: what runs on a worker; ``progress``: the live lines and the tally.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.datasets import check_data
from harness.errors import HarnessError
from harness.models import get_model
from harness.spec import ExperimentSpec, RunSpec, environment_names, expand, with_config
from harness.store import ResultsStore
from harness.sweep.cluster import (
    check_environments,
    check_resources,
    cluster,
    held,
    joins,
    ray_defaults,
    ray_log,
    run_device,
)
from harness.sweep.progress import Progress, SweepResult
from harness.sweep.rounds import run_rounds
from harness.sweep.search import search, searcher
from harness.sweep.tasks import run_grid
from harness.tracking import open_tracker

__all__ = ["SweepResult", "cluster", "held", "preflight", "sweep"]


def preflight(spec: ExperimentSpec, address: str | None) -> None:
    """Checks that need no cluster: data where the driver can see it, the metric, the searcher."""
    if spec.study == "hpo" and spec.metric.startswith("val_pixel") and not get_model(spec.model).anomaly_maps:
        raise HarnessError(f"metric: {spec.model} makes no anomaly maps; use val_image_AUROC or val_image_F1Max")
    root = Path(spec.data.root).expanduser()
    # On a cluster the data (and weights) may live on the workers only: they check it there.
    if address is None or root.exists():
        for category in spec.data.categories:
            check_data(spec.data, category)
    if address is None:
        adapter = get_model(spec.model)
        adapter.check(adapter.Args.model_validate(spec.model_params()))  # weights it cannot get: now
    if spec.study == "hpo":
        searcher(spec)


def sweep(spec: ExperimentSpec, results: Path, address: str | None = None) -> SweepResult:
    """Run a whole study; records land in ``results/<name>/runs/``."""
    joined = joins(address)
    ray_defaults(joined)  # before preflight, which may import Ray Tune
    store = ResultsStore(results)
    store.check_writable()
    preflight(spec, joined)
    tally = SweepResult(0, [], 0, [])

    def run(runs: list[RunSpec]) -> None:
        progress = Progress(len(runs))
        run_grid(runs, spec, store, progress)
        tally.add(progress)

    tracker = open_tracker(spec, results)  # online without a key fails here, before any run
    if tracker is not None:
        tracker.attach(store)
    try:
        with cluster(address), ray_log(Path(results) / spec.name / "ray.log"):
            check_resources(spec)
            check_environments(spec)
            if spec.adaptive is not None:
                run_rounds(spec, spec.adaptive.plan(), store, run_device(spec), run)
            elif spec.study == "seeds":
                run(expand(spec, run_device(spec)))
            else:
                _searches(spec, store, results, tally, run)
        if tracker is not None:
            tracker.finish(store)
    finally:
        if tracker is not None:
            tracker.close()
    return tally


def _searches(
    spec: ExperimentSpec, store: ResultsStore, results: Path, tally: SweepResult, run: Callable[[list[RunSpec]], None]
) -> None:
    """Per environment and category: the search, then its best configuration's runs on the test
    split (in that environment: whether the winner holds across environments is a finding)."""
    storage = spec.tune_storage or str(Path(results).resolve() / spec.name / "tune")
    for env in environment_names(spec):
        for category in spec.data.categories:
            where = f"{category} in {env}" if env else category
            trials = Progress(spec.num_samples)
            selection = search(spec, category, store, storage, trials, env)
            tally.add(trials)
            if selection is None:
                tally.failed.append(f"{where}: no trial finished; nothing to select")
                continue
            print(
                f"best {where}: {selection['config']} {spec.metric}={selection['value']:.4f}; "
                f"its runs on the test split:"
            )
            best = with_config(spec, selection["config"])
            runs = expand(best, run_device(spec), role="best", selection=selection, environments=[env])
            run([r for r in runs if r.category == category])
