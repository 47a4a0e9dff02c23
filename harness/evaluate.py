"""Evaluation on the full test split, the same for every model.

Predictions from all test batches are gathered, put in a fixed order (image path) and
scored at once with anomalib's own metric classes, so a metric never depends on how the
test set was batched, and the numbers are anomalib's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from harness.hashing import float32_sha256


@dataclass(frozen=True)
class Predicted:
    """Raw per-image outputs in a fixed order: paths relative to the category directory."""

    paths: list[str]
    labels: np.ndarray  # int, 1 = anomalous
    scores: np.ndarray  # float32 raw image scores
    maps: np.ndarray | None  # float32 (N, H, W) raw anomaly maps
    masks: np.ndarray | None  # uint8 (N, H, W) ground truth

    @property
    def scores_sha256(self) -> str:
        return float32_sha256(self.scores)

    @property
    def maps_sha256(self) -> str | None:
        if self.maps is None:
            return None
        return float32_sha256(self.maps)


def _relative(path: str, base: Path) -> str:
    p = Path(path).resolve()
    try:
        return p.relative_to(base.resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def collect(batches: list[Any], base: Path) -> Predicted:
    """Gather anomalib predict batches into one ``Predicted``, sorted by image path."""
    import torch

    paths = [_relative(p, base) for b in batches for p in b.image_path]
    order = np.argsort(np.array(paths), kind="stable")

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(b, name) for b in batches]
        if any(p is None for p in parts):
            return None
        joined = torch.cat([p.detach().cpu() for p in parts])
        # Under bf16 autocast outputs may come as bfloat16, which numpy lacks: exact in float32.
        arr = (joined.float() if joined.dtype == torch.bfloat16 else joined).numpy()
        return arr[order]

    scores = cat("pred_score")
    labels = cat("gt_label")
    if scores is None or labels is None:
        raise RuntimeError("the model returned no image scores or the data no labels")
    maps = cat("anomaly_map")
    masks = cat("gt_mask")
    if maps is not None:
        maps = maps.reshape(len(paths), *maps.shape[-2:]).astype(np.float32)
    if masks is not None:
        masks = masks.reshape(len(paths), *masks.shape[-2:]).astype(np.uint8)
    return Predicted(
        paths=[paths[i] for i in order],
        labels=labels.astype(np.int64).reshape(-1),
        scores=scores.astype(np.float32).reshape(-1),
        maps=maps,
        masks=masks,
    )


def compute_metrics(pred: Predicted) -> dict[str, float | None]:
    """Image AUROC and F1-max; pixel AUROC and AUPRO where there is a map (else None)."""
    import torch
    from anomalib.metrics import AUPRO, AUROC, F1Max

    def run(metric: Any, **fields: np.ndarray) -> float | None:
        metric.update(SimpleNamespace(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in fields.items()}))
        value = float(metric.compute())
        return value if math.isfinite(value) else None  # undefined, not a number to average

    image = {"pred_score": pred.scores, "gt_label": pred.labels}
    out: dict[str, float | None] = {
        "image_AUROC": run(AUROC(fields=["pred_score", "gt_label"]), **image),
        "image_F1Max": run(F1Max(fields=["pred_score", "gt_label"]), **image),
        "pixel_AUROC": None,
        "pixel_AUPRO": None,
    }
    if pred.maps is not None and pred.masks is not None:
        pixel = {"anomaly_map": pred.maps, "gt_mask": pred.masks.astype(bool)}
        out["pixel_AUROC"] = run(AUROC(fields=["anomaly_map", "gt_mask"]), **pixel)
        out["pixel_AUPRO"] = run(AUPRO(fields=["anomaly_map", "gt_mask"]), **pixel)
    return out
