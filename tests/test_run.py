"""Real anomalib runs at 64 px on tiny synthetic data (seconds each on 2 cores)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from sklearn.metrics import precision_recall_curve, roc_auc_score

from harness.check.verify import verify
from harness.evaluate import collect, compute_metrics
from harness.models.patchcore import PatchcoreArgs
from harness.record import decode_record
from harness.run import fit_and_predict, run_one
from harness.store import ResultsStore
from tests.conftest import folder_layout, make_run_spec

pytestmark = pytest.mark.slow
MODELS = ["patchcore", "ganomaly"]

# DESIGN.md: the fields every record must hold.
REQUIRED = {
    "schema",
    "run_id",
    "sweep",
    "study",
    "model",
    "params",
    "category",
    "seed",
    "repeat",
    "status",
    "error",
    "metrics",
    "predictions",
    "timing",
    "memory",
    "environment",
}
REQUIRED_ENV = {
    "host",
    "platform",
    "python",
    "torch",
    "torchvision",
    "anomalib",
    "cuda",
    "cudnn",
    "device",
    "gpu_name",
    "cpu_model",
    "threads",
    "determinism",
    "machine_id",
    "environment_id",
    "execution",
    "torch_build",
    "cpu",
    "kernel",
}


@pytest.mark.parametrize("model", MODELS)
def test_record_is_complete_and_stored_atomically(model: str, synth_root: Path, tmp_path: Path) -> None:
    record = run_one(make_run_spec(model, synth_root))
    doc = record.to_builtins()
    assert doc["status"] == "ok", doc["error"]
    assert doc.keys() >= REQUIRED
    assert doc["environment"].keys() >= REQUIRED_ENV
    assert doc["environment"]["device"] == "cpu"
    assert doc["environment"]["threads"] == 2
    assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Max"} <= doc["metrics"].keys()
    pred = doc["predictions"]
    assert len(pred["image_scores"]) == len(pred["labels"]) == len(pred["image_paths"]) == 12
    assert pred["image_paths"] == sorted(pred["image_paths"])
    assert pred["image_paths"][0] == "test/good/000.png"
    assert sum(pred["labels"]) == 8
    assert doc["timing"]["fit_s"] > 0
    assert doc["timing"]["latency_ms_per_image"] > 0
    assert doc["memory"]["peak_rss_bytes"] > 100 * 2**20
    assert doc["params"]["data"]["sha256"] == doc["data"]["sha256"]
    assert verify([record]) == {}, "the checker's own metrics of its scores are anomalib's, to 1e-6"
    assert "root" not in doc["params"]["data"], "a path is not part of what defines a run"
    if model == "ganomaly":
        assert doc["metrics"]["pixel_AUROC"] is None
        assert pred["maps_sha256"] is None
    else:
        assert 0 <= doc["metrics"]["pixel_AUROC"] <= 1
        assert pred["maps_sha256"]
    store = ResultsStore(tmp_path / "results")
    path = store.put(record)
    assert path == tmp_path / "results" / "test" / "runs" / f"{doc['run_id']}.json"
    assert decode_record(path.read_bytes()) == record  # read back with the schema it was written with
    assert json.loads(path.read_text()) == doc
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp file left behind"


@pytest.mark.parametrize("model", MODELS)
def test_image_auroc_recomputes_from_stored_scores(model: str, synth_root: Path) -> None:
    doc = run_one(make_run_spec(model, synth_root, category="weave")).to_builtins()
    pred = doc["predictions"]
    expected = roc_auc_score(pred["labels"], pred["image_scores"])
    assert abs(doc["metrics"]["image_AUROC"] - expected) < 1e-6
    precision, recall, _ = precision_recall_curve(pred["labels"], pred["image_scores"])
    f1 = np.nanmax(2 * precision * recall / np.where(precision + recall == 0, np.nan, precision + recall))
    assert abs(doc["metrics"]["image_F1Max"] - f1) < 1e-6


def test_pixel_auroc_matches_sklearn_on_the_raw_maps(synth_root: Path, tmp_path: Path) -> None:
    spec = make_run_spec("patchcore", synth_root)
    pred = fit_and_predict(spec, PatchcoreArgs.model_validate(spec.model_args), "cpu", tmp_path).pred
    assert pred is not None
    metrics = compute_metrics(pred)
    assert pred.maps is not None
    assert pred.masks is not None
    assert pred.maps.shape == pred.masks.shape == (12, 64, 64)
    expected = roc_auc_score(pred.masks.reshape(-1), pred.maps.reshape(-1))
    assert abs(metrics["pixel_AUROC"] - expected) < 1e-6
    assert metrics["image_AUROC"] > 0.7, "PatchCore must find synthetic holes and stains even untrained"


@pytest.mark.parametrize("model", MODELS)
def test_same_seed_is_bit_identical(model: str, synth_root: Path) -> None:
    a = run_one(make_run_spec(model, synth_root, repeat=0))
    b = run_one(make_run_spec(model, synth_root, repeat=1))
    assert a.run_id != b.run_id
    assert a.predictions
    assert b.predictions
    assert a.predictions.model_sha256 == b.predictions.model_sha256
    assert a.predictions.scores_sha256 == b.predictions.scores_sha256
    assert a.predictions.maps_sha256 == b.predictions.maps_sha256
    assert a.metrics == b.metrics


@pytest.mark.parametrize("model", MODELS)
def test_scores_do_not_depend_on_test_batch_size(model: str, synth_root: Path) -> None:
    """Raw per-image scores: no min-max over batches (anomalib's GANomaly test path has one).

    Bitwise equality is not promised across batch sizes: oneDNN picks conv kernels by batch
    size (GANomaly differs in the last bits at 1 and 3 vs 4+ here). ``eval_batch_size`` is
    in ``params``, so determinism verdicts only compare runs with the same one.
    """
    small = run_one(make_run_spec(model, synth_root, eval_batch_size=3))
    whole = run_one(make_run_spec(model, synth_root, eval_batch_size=32))
    assert small.predictions
    assert whole.predictions
    assert small.predictions.model_sha256 == whole.predictions.model_sha256
    np.testing.assert_allclose(small.predictions.image_scores, whole.predictions.image_scores, rtol=1e-5)
    assert np.argsort(small.predictions.image_scores).tolist() == np.argsort(whole.predictions.image_scores).tolist()
    assert small.metrics == pytest.approx(whole.metrics, abs=1e-6)
    assert max(whole.predictions.image_scores) != 1.0 or min(whole.predictions.image_scores) != 0.0, "normalised"


def test_seed_reaches_the_patchcore_coreset(synth_root: Path, tmp_path: Path) -> None:
    """With a fixed backbone (a local weights file) only the coreset draws from the seed."""
    torch.manual_seed(123)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    args = {"pre_trained": True, "weights": str(weights), "coreset_sampling_ratio": 0.05}
    runs = [run_one(make_run_spec("patchcore", synth_root, seed=s, model_args=args)) for s in (0, 1, 0)]
    hashes = [r.predictions.model_sha256 for r in runs if r.predictions]
    assert hashes[0] != hashes[1], "different seeds must pick different memory banks"
    assert hashes[0] == hashes[2]
    assert runs[0].params["model_args"]["weights_sha256"] == runs[1].params["model_args"]["weights_sha256"]


def test_folder_format_runs_through_the_same_pipeline(synth_root: Path, tmp_path: Path) -> None:
    folder_layout(synth_root / "disc", tmp_path, masks=True)
    spec = make_run_spec(
        "patchcore",
        tmp_path,
        category="part",
        format="folder",
        normal_dir="normal",
        abnormal_dir="abnormal",
        mask_dir="masks",
        normal_split_ratio=0.5,
    )
    record = run_one(spec)
    assert record.status == "ok", record.error
    assert record.predictions
    assert sum(record.predictions.labels) == 8
    assert record.data.n_test == len(record.predictions.labels) == 8 + 8, "half of the 16 normal images held out"
    assert record.data.n_train == 8
    assert record.metrics["pixel_AUROC"] is not None


def test_failure_during_training_is_a_failed_record(synth_root: Path) -> None:
    record = run_one(make_run_spec("patchcore", synth_root, model_args={"coreset_sampling_ratio": 0.0001}))
    assert record.status == "failed"
    assert record.error
    assert "coreset_size must be a positive integer" in record.error
    assert record.metrics == {}
    assert record.predictions is None


def test_collect_orders_by_path_whatever_the_batches() -> None:
    """Each image's map and mask carry its score and label, so any mix-up between fields shows."""

    def batch(paths: list[str], scores: list[float]) -> SimpleNamespace:
        labels = [p.startswith("test/bad") for p in paths]
        return SimpleNamespace(
            image_path=[f"/r/cat/{p}" for p in paths],
            pred_score=torch.tensor(scores),
            gt_label=torch.tensor(labels),
            anomaly_map=torch.tensor(scores).reshape(-1, 1, 1).expand(-1, 2, 2).clone(),
            gt_mask=torch.tensor(labels, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, 2, 2).clone(),
        )

    a = collect(
        [batch(["test/good/1.png", "test/bad/0.png"], [0.1, 0.9]), batch(["test/good/0.png"], [0.2])], Path("/r/cat")
    )
    b = collect(
        [batch(["test/good/0.png"], [0.2]), batch(["test/bad/0.png", "test/good/1.png"], [0.9, 0.1])], Path("/r/cat")
    )
    for pred in (a, b):
        assert pred.paths == ["test/bad/0.png", "test/good/0.png", "test/good/1.png"]
        assert pred.scores.tolist() == pytest.approx([0.9, 0.2, 0.1])
        assert pred.labels.tolist() == [1, 0, 0]
        assert pred.maps is not None
        assert pred.masks is not None
        np.testing.assert_array_equal(pred.maps[:, 0, 0], pred.scores)
        np.testing.assert_array_equal(pred.masks[:, 1, 1], pred.labels)
    assert a.scores_sha256 == b.scores_sha256
    assert a.maps_sha256 == b.maps_sha256


@pytest.mark.slow
def test_every_trial_is_scored_on_the_same_validation_split(synth_root: Path, tmp_path: Path) -> None:
    """Whatever a trial's model drew from the RNGs before, its synthetic anomalies are the same,
    and the draws for them leave the trial's own RNG streams untouched."""

    from harness.datasets import build_datamodule
    from harness.run import build_validation_split
    from harness.spec import ValidationSpec
    from harness.streams import Streams

    spec = make_run_spec("ganomaly", synth_root)
    splits = []
    for draws in (1, 1000):  # as two models of different sizes would have drawn at init
        torch.manual_seed(0)
        np.random.seed(0)
        torch.rand(draws)
        np.random.rand(draws)
        before = torch.random.get_rng_state(), np.random.get_state()[1].copy()
        datamodule = build_datamodule(spec.data, "disc", ValidationSpec())
        (tmp_path / str(draws)).mkdir()
        build_validation_split(datamodule, tmp_path / str(draws), Streams.of(0, ("init", "order", "split"), None))
        assert torch.equal(torch.random.get_rng_state(), before[0])
        assert np.array_equal(np.random.get_state()[1], before[1])
        val = [datamodule.val_data[i] for i in range(len(datamodule.val_data))]
        splits.append((torch.stack([v.image for v in val]), [int(v.gt_label) for v in val]))
    assert splits[0][1] == splits[1][1]
    assert 0 < sum(splits[0][1]) < len(splits[0][1])
    assert torch.equal(splits[0][0], splits[1][0])


@pytest.mark.slow
@pytest.mark.parametrize("fails", [False, True])
def test_a_trial_leaves_no_synthetic_anomalies_behind(
    fails: bool, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validation split's synthetic images are made in the run's own temporary folder,
    and go with it when the run ends, failed or not (anomalib's fixed folder under /tmp kept
    them, one per trial, for as long as the process held the datamodule)."""
    from anomalib.data.utils import synthetic
    from anomalib.engine import Engine

    from harness.spec import ValidationSpec

    made: list[Path] = []
    init = synthetic.SyntheticAnomalyDataset.__init__

    def recording_init(self: synthetic.SyntheticAnomalyDataset, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self.root)

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic.SyntheticAnomalyDataset, "__init__", recording_init)
    if fails:
        monkeypatch.setattr(Engine, "fit", full_disk)
    tmp = tmp_path / "tmp"  # the system temp dir, as the run sees it (anomalib's ROOT was set on import)
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    spec = make_run_spec("ganomaly", synth_root).model_copy(update={"role": "trial", "validation": ValidationSpec()})
    record = run_one(spec)
    assert record.status == ("failed" if fails else "ok"), record.error
    assert record.validation is not None
    assert record.validation.n_val_anomalous == (0 if fails else 4)
    (root,) = made
    assert root.is_relative_to(tmp), f"{root} is outside the run's own temporary folder"
    assert not root.exists()
    assert list(tmp.iterdir()) == []


def test_a_killed_runs_work_folder_is_removed_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray worker killed mid-run leaves its folder; the next run on the machine removes it."""
    from harness.run import WORKDIR_PREFIX, remove_dead_workdirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"{WORKDIR_PREFIX}{dead.pid}-abc"
    (left / "synthetic_anomaly").mkdir(parents=True)
    live = tmp_path / f"{WORKDIR_PREFIX}{os.getpid()}-def"
    live.mkdir()
    remove_dead_workdirs()
    assert not left.exists()
    assert live.exists()
