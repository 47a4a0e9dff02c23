"""Run records built by hand, for checker and report tests with known answers (and the benchmark).

A record here has every field a real one has (see ``harness.record.RunRecord``); a test sets
only what its answer depends on: metrics, scores, hashes, environments.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from harness.check import verify
from harness.hashing import float32_sha256, stable_hash
from harness.record import RunRecord

ENV = {
    "anomalib": "2.7.0",
    "cpu_count": 2,
    "cpu_model": "AMD EPYC",
    "cuda": "13.0",
    "cudnn": 92400,
    "determinism": {
        "cublas_workspace_config": ":4096:8",
        "cudnn_benchmark": False,
        "cudnn_deterministic": True,
        "deterministic_algorithms": True,
    },
    "device": "cpu",
    "cpu": {
        "family": "23",
        "flags_sha256": "c090079937c53213",
        "isa": ["sse4_1", "avx", "avx2", "fma"],
        "microcode": "0x1000065",
        "model": "AMD EPYC",
        "model_number": "1",
        "stepping": "2",
        "vendor": "AuthenticAMD",
    },
    "execution": {
        "autocast": "fp32",
        "deterministic": True,
        "device": "cpu",
        "matmul_precision": "highest",
        "onednn": True,
        "threads": 2,
    },
    "gpu_capability": None,
    "driver": None,
    "image": None,
    "kernel": "6.18.44",
    "requested": {},
    "torch_build": {
        "blas": "mkl",
        "cpu_capability": "avx2",
        "lapack": "mkl",
        "mkl": "2024.2-Product",
        "onednn_available": True,
        "onednn_isa": "AVX2",
        "onednn_version": "v3.12.0",
    },
    "variant": None,
    "gpu_count": 0,
    "gpu_name": None,
    "environment_id": "cpu-epyc-2t",
    "machine_id": "epyc",
    "harness_commit": "0123456789abcdef0123456789abcdef01234567",
    "host": "vm",
    "lightning": "2.6.6",
    "numpy": "2.4.6",
    "platform": "Linux-6.18-x86_64",
    "python": "3.11.7",
    "scikit-learn": "1.9.1",
    "threads": 2,
    "timm": "1.0.31",
    "torch": "2.14.1",
    "torchvision": "0.29.1",
}
GPU_ENV = {**ENV, "device": "cuda:0", "gpu_count": 1, "gpu_name": "NVIDIA H200", "gpu_capability": "9.0"}
GPU_ENV |= {"environment_id": "gpu-h200", "machine_id": "epyc-h200", "driver": "580.95.05"}
GPU_ENV["execution"] = {**ENV["execution"], "device": "cuda:0"}

PARAMS: dict[str, dict[str, Any]] = {
    "patchcore": {
        "data": {"format": "mvtec", "image_size": 64, "train_batch_size": 8, "eval_batch_size": 8, "sha256": "d0"},
        "deterministic": True,
        "model_args": {"backbone": "resnet18", "coreset_sampling_ratio": 0.1, "layers": ["layer2", "layer3"]},
    },
    "ganomaly": {
        "data": {"format": "mvtec", "image_size": 64, "train_batch_size": 8, "eval_batch_size": 8, "sha256": "d0"},
        "deterministic": True,
        "model_args": {"lr": 0.0002, "max_epochs": 2},
    },
}

# 50 good and 20 defective test images: an image AUROC is a multiple of 1/1000, so a value of
# three decimals is exactly what the scores give (the checker verifies records against them).
LABELS = [0] * 50 + [1] * 20
# A trial's validation block, curve to be filled in.
VALIDATION: dict[str, Any] = {
    "split": "synthetic",
    "ratio": 0.5,
    "n_val": 16,
    "n_val_anomalous": 8,
    "curve": [],
    "stopped_early": False,
}


def scores_for(auroc: float) -> list[float]:
    """Scores for LABELS whose image AUROC is exactly ``auroc``: good images at 1..N, each
    defective one just above as many of them as its share of the wins (no ties)."""
    good = [i for i, lab in enumerate(LABELS) if lab == 0]
    bad = [i for i, lab in enumerate(LABELS) if lab == 1]
    wins = round(auroc * len(good) * len(bad))
    if abs(wins - auroc * len(good) * len(bad)) > 1e-6:
        raise ValueError(f"an AUROC of {auroc} is not a multiple of 1/{len(good) * len(bad)}")
    q, r = divmod(wins, len(bad))
    scores = [0.0] * len(LABELS)
    for rank, i in enumerate(good):
        scores[i] = (rank + 1) / (len(good) + 2)
    for k, i in enumerate(bad):
        scores[i] = (q + (k < r) + 0.5) / (len(good) + 2)
    return scores


def image_metrics(scores: list[float]) -> dict[str, float]:
    """What the checker computes from a record's scores (verified against scikit-learn in test_check)."""
    out = verify.image_metrics(np.array(LABELS), np.array([scores], dtype=np.float64))
    return {m: float(v[0]) for m, v in out.items()}


def _sha(values: Any) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def make_record(
    *,
    sweep: str = "s1",
    model: str = "patchcore",
    category: str = "disc",
    seed: int = 0,
    repeat: int = 0,
    metrics: dict[str, float | None] | None = None,
    scores: list[float] | None = None,
    maps_sha256: str | None = "auto",
    env: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    status: str = "ok",
    role: str = "run",
    study: str = "seeds",
    fit_s: float = 1.0,
    peak_rss_bytes: int = 2**30,
    n_test: int | None = None,
    started_at: str = "2026-11-30T10:00:00+00:00",
    **extra: Any,
) -> dict[str, Any]:
    """A complete record that verifies: scores give its image AUROC (0.9 unless given), and image
    metrics not given are those of its scores. Given scores and metrics that disagree make a
    corrupt record, as tampering would."""
    given = dict(metrics or {})
    if scores is None:
        target = given.get("image_AUROC")
        scores = scores_for(0.9 if target is None else target)
    metrics = {**image_metrics(scores), "pixel_AUROC": 0.95, "pixel_AUPRO": 0.8, **given}
    if model == "ganomaly":
        metrics = {k: v for k, v in metrics.items() if not k.startswith("pixel_")}
    env = copy.deepcopy(env or ENV)
    params = copy.deepcopy(params or PARAMS[model])
    if maps_sha256 == "auto":
        maps_sha256 = None if model == "ganomaly" else _sha(["map", *scores])
    ok = status == "ok"
    run_id = stable_hash([sweep, model, params, category, seed, repeat, env["environment_id"], role])
    record: dict[str, Any] = {
        "schema": "harness.run/1",
        "run_id": run_id,
        "sweep": sweep,
        "study": study,
        "model": model,
        "params": params,
        "category": category,
        "seed": seed,
        "repeat": repeat,
        "status": status,
        "error": None if ok else "OutOfMemoryError: CUDA out of memory (at run.py:301)",
        "metrics": metrics if ok else {},
        "predictions": {
            "image_paths": [f"test/{'good' if lab == 0 else 'hole'}/{i:03d}.png" for i, lab in enumerate(LABELS)],
            "labels": LABELS,
            "image_scores": scores,
            "scores_sha256": float32_sha256(scores),  # as runs hash them
            "maps_sha256": maps_sha256,
            "model_sha256": _sha(["model", *scores]),
        }
        if ok
        else None,
        "timing": {
            "fit_s": fit_s if ok else None,
            "test_s": 0.5 if ok else None,
            "latency_ms_per_image": 10.0 if ok else None,
            "total_s": fit_s + 1.0,
        },
        "memory": {"peak_rss_bytes": peak_rss_bytes, "process_peak_rss_bytes": peak_rss_bytes, "peak_gpu_bytes": None},
        "data": {"root": "datasets/synth", "sha256": "d0", "n_train": 32, "n_test": n_test or len(LABELS)},
        "environment": env,
        "started_at": started_at,
        "finished_at": started_at.replace("10:00:00", "10:00:05"),
        "role": role,
        "node_id": None,
        "validation": None,
        "selection": None,
        "features": None,
        "streams": None,
        "seeds_plan": None,
    }
    record.update(extra)
    return record


def typed(record: dict[str, Any]) -> RunRecord:
    """A hand-built record as the harness passes it around (what ``ResultsStore.put`` takes)."""
    return RunRecord.from_builtins(record)


def write_records(root: Path, records: list[dict[str, Any]]) -> Path:
    """Store records as the harness does (``ROOT/<sweep>/runs/<run_id>.json``); returns ROOT."""
    for rec in records:
        path = root / rec["sweep"] / "runs" / f"{rec['run_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, sort_keys=True, indent=1))
    return root
