"""Records whose numbers are verified: a record's hash and image metrics, recomputed from its scores.

The checker does not trust what a record says about itself. An ``ok`` record with test
predictions is corrupt when its ``scores_sha256`` is not the hash of its scores (float32
bytes, as the run hashed them), or its image AUROC or F1-max is not what its scores and
labels give (the harness's own computation, within ``METRIC_TOLERANCE``). A corrupt record
is named, counted and left out of every statistic, and a sweep runs it again.

Records of one category share their test images and so their labels: they are verified a
batch at a time, with one array operation per batch (no loop over records).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from harness.hashing import float32_sha256
from harness.record import Predictions, RunRecord

METRIC_TOLERANCE = 1e-6  # anomalib computes in float32; exact AUROC and F1-max agree to ~1e-7
VERIFIED_METRICS = ("image_AUROC", "image_F1Max")
_ROWS = 512  # records compared at once: bounds memory at rows x positives x negatives


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Image AUROC and F1-max of each row of ``scores`` (records x images) against ``labels``.

    AUROC: the chance a defective image scores above a good one, ties half (the area under
    the ROC curve, exactly). F1-max: the best F1 over thresholds at each distinct score,
    where F1 = 2 TP / (predicted positive + actual positive). Undefined ones (one class
    only) are left out.
    """
    pos, neg = scores[:, labels == 1], scores[:, labels == 0]
    out: dict[str, np.ndarray] = {}
    if not (pos.shape[1] and neg.shape[1]):
        return out
    above = (pos[:, :, None] > neg[:, None, :]).sum((1, 2))
    ties = (pos[:, :, None] == neg[:, None, :]).sum((1, 2))
    out["image_AUROC"] = (above + 0.5 * ties) / (pos.shape[1] * neg.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    tp = np.cumsum(labels[order], axis=1)
    predicted = np.arange(1, scores.shape[1] + 1)
    last_of_tie = np.ones_like(ranked, dtype=bool)
    last_of_tie[:, :-1] = ranked[:, :-1] != ranked[:, 1:]  # a threshold takes every image of equal score
    out["image_F1Max"] = np.where(last_of_tie, 2 * tp / (predicted + labels.sum()), 0.0).max(axis=1)
    return out


def verify(records: Sequence[RunRecord]) -> dict[int, str]:
    """Which of ``records`` are corrupt (by index), and why: one line each."""
    bad: dict[int, str] = {}
    batches: dict[tuple[int, ...], list[tuple[int, RunRecord, Predictions]]] = defaultdict(list)
    for i, record in enumerate(records):
        pred = record.predictions
        if not record.ok or pred is None:
            continue
        if len(pred.image_scores) != len(pred.labels):
            bad[i] = f"{len(pred.image_scores)} scores for {len(pred.labels)} labels"
        else:
            batches[tuple(pred.labels)].append((i, record, pred))
    for labels, members in batches.items():
        for start in range(0, len(members), _ROWS):
            chunk = members[start : start + _ROWS]
            scores = np.array([pred.image_scores for _, _, pred in chunk], dtype=np.float64)
            computed = image_metrics(np.array(labels), scores)
            for row, (i, record, pred) in enumerate(chunk):
                if float32_sha256(scores[row]) != pred.scores_sha256:
                    bad[i] = "scores_sha256 is not the hash of its image_scores"
                elif why := _metric_mismatch(record, {m: float(v[row]) for m, v in computed.items()}):
                    bad[i] = why
    return bad


def _metric_mismatch(record: RunRecord, computed: dict[str, float]) -> str | None:
    for metric in VERIFIED_METRICS:
        if metric not in computed:
            continue  # undefined for these labels (one class only): nothing to hold it against
        stored, value = record.metrics.get(metric), computed[metric]
        if stored is None or abs(stored - value) > METRIC_TOLERANCE:
            return f"{metric} {stored} stored, {value:.6g} from its scores and labels"
    return None
