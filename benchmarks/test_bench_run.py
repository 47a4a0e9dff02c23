"""One real `harness run` of each model at 64 and 128 px on this machine.

Run with `make bench`. Each case is the user's command in a fresh process (imports
included, as a user waits for them), one round each; the record's own fit/test seconds and
the process's peak RSS go into ``extra_info``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.synth import synth

# GANomaly at 5 epochs (anomalib's 100 would take the whole benchmark budget on 2 cores).
MODEL_SETS = {"patchcore": ["model_args.pre_trained=false"], "ganomaly": ["model_args.max_epochs=5"]}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Warm the OS file cache once, so the first case does not pay the cold import for all.
    subprocess.run([sys.executable, "-c", "import anomalib.engine, anomalib.models"], check=True, capture_output=True)
    root = tmp_path_factory.mktemp("synth")
    for size in (64, 128):
        synth(root / str(size), ("disc",), n_train=32, n_test=24, size=size, seed=0)
    return root


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("model", ["patchcore", "ganomaly"])
def test_harness_run(benchmark: Any, data_root: Path, tmp_path: Path, model: str, size: int) -> None:
    sets = [f"data.image_size={size}", "name=bench", *MODEL_SETS[model]]
    cmd = [
        sys.executable,
        "-m",
        "harness",
        "run",
        "--model",
        model,
        "--data-root",
        str(data_root / str(size)),
        "--category",
        "disc",
        "--results",
        str(tmp_path),
        *(x for s in sets for x in ("--set", s)),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = benchmark.pedantic(
        subprocess.run, args=(cmd,), kwargs={"capture_output": True, "text": True, "env": env}, rounds=1, iterations=1
    )
    assert out.returncode == 0, out.stderr
    (path,) = tmp_path.glob("bench/runs/*.json")
    record = json.loads(path.read_text())
    benchmark.extra_info.update(
        fit_s=record["timing"]["fit_s"],
        test_s=record["timing"]["test_s"],
        peak_rss_gib=round(record["memory"]["process_peak_rss_bytes"] / 2**30, 3),
        image_AUROC=record["metrics"]["image_AUROC"],
    )
