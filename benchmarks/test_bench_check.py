"""`harness check`, `harness report` and `load_runs` over stores of 99,000 records: time and
peak memory, cold (no index) and warm (index and memo written, no record changed).

Run with `make bench`. Targets (issue 18): warm, `check --json` at most 3 s, `report` at most
10 s, the DataFrame at most 2 s; cold `check` no slower than before; at most 1 GiB each. Two
stores of records of real size (MVTec's test split per category, so 42-167 scores and paths a
record):

- ``year``, what a year of a lab's MVTec work could look like: 10 PatchCore seed sweeps (each
  its own config) and 10 GANomaly searches on all 15 categories; every test configuration in 3
  environments x 30 seeds x 2 repeats (bitwise on the CPU, last-bit differences on one GPU, and
  a little apart across environments, so 36,000 pairs have their scores compared); 300 trials
  per search and category, with 10-epoch validation curves;
- ``large-groups``: few large groups, many compared: 8 PatchCore configurations x 15
  categories x 412 seeds x 2 repeats, every pair of configurations compared in each category.

Each command runs as a user runs it, a fresh process; its peak memory is the largest process
tree RSS sampled every 20 ms (the parser's and the plots' worker processes included).

Before and after a change, in one run on one store: point ``HARNESS_BENCH_BASELINE`` at another
checkout of the harness (``git worktree add /tmp/before main``) and the same commands run from
there too, side by side (cold: a checkout from before the index has none).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

import tests.recordkit as rk
from harness.report import MVTEC_TEST_IMAGES

SEEDS, REPEATS, SWEEPS, TRIALS = 30, 2, 10, 300
BASELINE = os.environ.get("HARNESS_BENCH_BASELINE")
# Each also under its older name, hardware_id, which a baseline from before environments reads.
HARDWARE = tuple(
    {**env, "hardware_id": env["environment_id"]}
    for env in (rk.ENV, rk.GPU_ENV, {**rk.GPU_ENV, "gpu_name": "NVIDIA A100", "environment_id": "gpu-a100"})
)


def _category_records(category: str) -> int:
    """Write one category's records (a process each: generation is the slow part, not the check)."""
    import random

    n_test = MVTEC_TEST_IMAGES[category]
    rk.LABELS[:] = [0] * (n_test // 3) + [1] * (n_test - n_test // 3)
    rng = random.Random(category)
    root = Path(os.environ["BENCH_STORE"])
    written = 0
    for s in range(SWEEPS):
        for model, role in (("patchcore", "run"), ("ganomaly", "best")):
            params = json.loads(json.dumps(rk.PARAMS[model]))
            params["model_args"]["sweep_index"] = s  # ten different configurations
            params["data"]["sha256"] = category
            sweep = f"{model}-{s}"
            selection = None
            if model == "ganomaly":
                trials = [_trial(sweep, category, params, t, n_test, rng) for t in range(TRIALS)]
                written += sum(_put(root, t) for t in trials)
                won = max(trials, key=lambda t: t["metrics"]["val_image_AUROC"])
                selection = {"metric": "val_image_AUROC", "mode": "max", "value": won["metrics"]["val_image_AUROC"]}
                selection |= {"trial_run_id": won["run_id"], "config": {"model_args.lr": 0.001}, "rule": "max"}
            for seed in range(SEEDS):
                # Defective images score higher by `shift`: image AUROC about 0.92 for PatchCore,
                # 0.5 for GANomaly; the records' image metrics are their scores' (they verify).
                shift = 0.6 if model == "patchcore" else 0.0
                base = [rng.random() + shift * lab for lab in rk.LABELS]
                for hw_index, env in enumerate(HARDWARE):
                    for repeat in range(REPEATS):
                        jitter = 1e-7 * (hw_index + (repeat if hw_index == 1 else 0))
                        metrics = {"pixel_AUROC": 0.95 + jitter}
                        rec = rk.make_record(
                            sweep=sweep, model=model, category=category, seed=seed, repeat=repeat, env=env,
                            params=params, metrics=metrics, scores=[x + jitter for x in base], role=role,
                            n_test=n_test, selection=selection,
                        )  # fmt: skip
                        written += _put(root, rec)
    return written


def _trial(sweep: str, category: str, params: dict[str, Any], t: int, n_test: int, rng: Any) -> dict[str, Any]:
    curve = [{"epoch": e, "val_image_AUROC": rng.random()} for e in range(1, 11)]
    trial = rk.make_record(
        sweep=sweep, model="ganomaly", category=category, seed=0, repeat=t, params=params, role="trial",
        env=HARDWARE[0], n_test=n_test, scores=[0.5] * len(rk.LABELS),  # replaced below: no test predictions
    )  # fmt: skip
    trial.update(
        metrics={"val_image_AUROC": curve[-1]["val_image_AUROC"]},
        predictions=None,
        validation={**rk.VALIDATION, "curve": curve},
    )
    return trial


def _put(root: Path, rec: dict[str, Any]) -> int:
    path = root / rec["sweep"] / "runs" / f"{rec['run_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")  # as the store writes them
    return 1


def _large_seed_studies(category: str) -> int:
    """The other shape: few large groups, many sweeps compared. One category's records of
    COMPARED_SWEEPS PatchCore configurations with LARGE_SEEDS seeds x 2 bitwise repeats each, in
    one environment: every pair of them compared per category (28 pairs, 420 comparisons of
    412 seeds a side over the store)."""
    import random

    n_test = MVTEC_TEST_IMAGES[category]
    rk.LABELS[:] = [0] * (n_test // 3) + [1] * (n_test - n_test // 3)
    rng = random.Random(category)
    root = Path(os.environ["BENCH_STORE"])
    written = 0
    for s in range(COMPARED_SWEEPS):
        params = json.loads(json.dumps(rk.PARAMS["patchcore"]))
        params["model_args"]["sweep_index"] = s
        params["data"]["sha256"] = category
        shift = 0.3 + 0.02 * s  # image AUROC about 0.75-0.8: neighbours within noise, far ones apart
        for seed in range(LARGE_SEEDS):
            scores = [rng.random() + shift * lab for lab in rk.LABELS]
            pixel = 0.9 + 0.05 * rng.random()
            for repeat in range(REPEATS):
                rec = rk.make_record(
                    sweep=f"config-{s}", model="patchcore", category=category, seed=seed, repeat=repeat,
                    params=params, metrics={"pixel_AUROC": pixel}, scores=scores, n_test=n_test,
                    fit_s=1.0 + rng.random(), env=HARDWARE[0],
                )  # fmt: skip
                written += _put(root, rec)
    return written


SHAPES = {"year": (_category_records, 99_000), "large-groups": (_large_seed_studies, 98_880)}
COMPARED_SWEEPS, LARGE_SEEDS = 8, 412


def build_store(root: Path, shape: str) -> Path:
    """Write a benchmark store of one shape under ``root`` (a process per category)."""
    write, expected = SHAPES[shape]
    os.environ["BENCH_STORE"] = str(root)
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        total = sum(pool.map(write, sorted(MVTEC_TEST_IMAGES)))
    assert total == expected
    return root


@pytest.fixture(scope="module", params=sorted(SHAPES))
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp(request.param), request.param)


def _measure(cmd: list[str], cwd: str | None) -> tuple[float, int]:
    """Wall time and the peak RSS of the process tree (sampled)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        top = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [top, *top.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    assert proc.returncode == 0, err[-2000:]
    return time.perf_counter() - t0, peak


COMMANDS = {
    "check": ["-m", "harness", "check", "{store}", "--json"],
    "report": ["-m", "harness", "report", "{store}", "--out", "{out}"],
    "frame": ["-c", "import sys; from harness.analysis import load_runs; load_runs(sys.argv[1])", "{store}"],
}


def _forget(store: Path) -> None:
    """Remove every index, memo and cached figure: the next command starts cold."""
    for path in [*store.glob("*/index"), store / ".index"]:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("state", ["cold", "warm"])
@pytest.mark.parametrize("version", ["current", *(["baseline"] if BASELINE else [])])
def test_commands_100k(benchmark: Any, store: Path, tmp_path: Path, command: str, state: str, version: str) -> None:
    if version == "baseline" and (state == "warm" or command == "frame"):
        pytest.skip("the baseline has no index to be warm, and no frame loader")
    cmd = [sys.executable, *(a.format(store=store, out=tmp_path / "big.md") for a in COMMANDS[command])]
    cwd = BASELINE if version == "baseline" else None  # `-m` imports the package of the working directory
    if state == "warm":
        _forget(store)
        _measure(cmd, cwd)  # writes the index, the memo and the figures
    setup = (lambda: _forget(store)) if state == "cold" else None
    wall, peak = benchmark.pedantic(_measure, args=(cmd, cwd), setup=setup, rounds=2, iterations=1)
    benchmark.extra_info.update(records=len(list(store.glob("*/runs/*.json"))), wall_s=round(wall, 2))
    benchmark.extra_info.update(peak_rss_gib=round(peak / 2**30, 3))
