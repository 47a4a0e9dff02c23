"""What a sweep costs on top of `harness run`, and what two parallel workers buy, on this machine.

Run with `make bench`. Three measurements side by side in one run, each a fresh process as a
user runs it, on the same 6 PatchCore runs (128 px, one CPU thread each):
a bare `harness run` (one of them), the sweep with one run at a time, and the sweep with two
at a time. Ratios go to ``extra_info``: the sweep's per-run overhead over the run's own
``total_s``, the bare run's, and the speed-up of two workers over one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from harness.synth import synth

REPO = Path(__file__).resolve().parent.parent
N_SEEDS = 6
SETS = ["data.image_size=128", "resources.cpu=1", "model_args.pre_trained=false", "name=bench"]


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return time.perf_counter() - t0


def _total_s(results: Path) -> list[float]:
    return [json.loads(p.read_text())["timing"]["total_s"] for p in results.glob("*/runs/*.json")]


def test_sweep_overhead_and_speedup(benchmark: Any, tmp_path: Path) -> None:
    root = tmp_path / "data"
    synth(root, ("disc",), n_train=32, n_test=24, size=128, seed=0)
    spec = yaml.safe_load((REPO / "experiments" / "smoke.yaml").read_text())
    spec["data"].update(root=str(root), categories=["disc"])
    spec["seeds"], spec["repeats"] = list(range(N_SEEDS)), 1
    spec_path = tmp_path / "bench.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    sets = [x for s in SETS for x in ("--set", s)]
    harness = [sys.executable, "-m", "harness"]
    walls: dict[str, float] = {}
    totals: dict[str, list[float]] = {}

    def measure() -> None:
        run_cmd = ["run", "--model", "patchcore", "--data-root", str(root), "--category", "disc"]
        walls["run"] = _timed([*harness, *run_cmd, *sets, "--results", str(tmp_path / "r-run")], env)
        totals["run"] = _total_s(tmp_path / "r-run")
        for name, concurrent in (("sweep_1", 1), ("sweep_2", 2)):
            res = tmp_path / f"r-{name}"
            cmd = [*harness, "sweep", str(spec_path), *sets, "--set", f"max_concurrent={concurrent}"]
            walls[name] = _timed([*cmd, "--results", str(res)], env)
            totals[name] = _total_s(res)
            assert len(totals[name]) == N_SEEDS

    try:
        benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    run_overhead = walls["run"] - totals["run"][0]
    sweep_overhead = (walls["sweep_1"] - sum(totals["sweep_1"])) / N_SEEDS
    benchmark.extra_info.update(
        runs=N_SEEDS,
        run_wall_s=round(walls["run"], 2),
        run_total_s=round(totals["run"][0], 2),
        run_overhead_s=round(run_overhead, 2),
        sweep_1_wall_s=round(walls["sweep_1"], 2),
        sweep_1_per_run_s=round(walls["sweep_1"] / N_SEEDS, 2),
        sweep_1_overhead_per_run_s=round(sweep_overhead, 2),
        sweep_2_wall_s=round(walls["sweep_2"], 2),
        speedup_2_workers=round(walls["sweep_1"] / walls["sweep_2"], 2),
        sweep_vs_bare_runs=round(walls["sweep_1"] / (N_SEEDS * walls["run"]), 2),
    )
