"""Shared fixtures: tiny synthetic data sets in tmp paths, and a fully offline environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing in the tests may reach a network: no hub downloads, no W&B, no Ray usage stats.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
# Every Ray node a test starts listens on loopback only (see harness.sweep.cluster).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from harness.spec import RunSpec, run_spec, validate_spec
from harness.synth import synth

# Small enough for seconds per run on 2 cores, big enough for AUROC to mean something.
TINY = {"n_train": 16, "n_test": 12, "size": 64}
FAST_ARGS: dict[str, dict[str, Any]] = {
    "patchcore": {"pre_trained": False},
    "ganomaly": {"max_epochs": 2, "n_features": 16, "latent_vec_size": 16},
}


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention data set shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("synth")
    synth(root, ("weave", "disc"), seed=0, **TINY)
    return root


@pytest.fixture
def own_root(tmp_path: Path) -> Path:
    """A data set of the test's own, for tests that damage it."""
    root = tmp_path / "data"
    synth(root, ("disc",), seed=0, **TINY)
    return root


def make_run_spec(
    model: str,
    root: Path,
    category: str = "disc",
    seed: int = 0,
    repeat: int = 0,
    model_args: dict[str, Any] | None = None,
    **data: Any,
) -> RunSpec:
    """A validated RunSpec at test size, through the same path as `harness run`."""
    raw = {
        "name": "test",
        "model": model,
        "model_args": {**FAST_ARGS[model], **(model_args or {})},
        "data": {
            "root": str(root),
            "categories": [category],
            "image_size": 64,
            "train_batch_size": 8,
            "eval_batch_size": 8,
            **data,
        },
        "seeds": [seed],
    }
    return run_spec(validate_spec(raw), category, seed, repeat, "cpu")


def folder_layout(src: Path, dst: Path, masks: bool) -> None:
    """A user's own images: normal/, abnormal/, masks/ (flat), as additive-manufacturing data comes."""
    cat = dst / "part"
    (cat / "normal").mkdir(parents=True)
    (cat / "abnormal").mkdir()
    for p in (src / "train" / "good").glob("*.png"):
        shutil.copy(p, cat / "normal" / p.name)
    for defect_dir in (src / "test").iterdir():
        if defect_dir.name == "good":
            continue
        for p in defect_dir.glob("*.png"):
            shutil.copy(p, cat / "abnormal" / f"{defect_dir.name}_{p.name}")
            if masks:
                (cat / "masks").mkdir(exist_ok=True)
                shutil.copy(
                    src / "ground_truth" / defect_dir.name / f"{p.stem}_mask.png",
                    cat / "masks" / f"{defect_dir.name}_{p.stem}_mask.png",
                )


def _ray_processes(tmp: Path) -> list[Any]:
    """Processes of one test's Ray cluster: their command line or RAY_TMPDIR names its temp dir.

    Worker processes retitle themselves (``ray::IDLE``), so the environment is checked too.
    """
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if str(tmp) in cmd or proc.environ().get("RAY_TMPDIR") == str(tmp):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_ray_processes(tmp: Path, grace_s: float = 10.0) -> int:
    """Stop what is left of one test's cluster, by PID (never by name: other clusters live here).

    Returns how many processes were still there after ``grace_s``.
    """
    import psutil

    deadline = time.monotonic() + grace_s
    while (left := _ray_processes(tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return len(left)


@pytest.fixture
def ray_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp dir of the test's own for Ray (short: Ray's socket paths have a length limit)."""
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    yield tmp
    kill_ray_processes(tmp, grace_s=2)
    shutil.rmtree(tmp, ignore_errors=True)
