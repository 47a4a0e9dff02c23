"""The harness's coreset sampler against anomalib's, and seed studies that extract features once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.models.components import KCenterGreedy

from harness.coreset import anomalib_draws, greedy_coreset
from harness.record import RunRecord
from harness.run import FeatureCache, run_one
from tests.conftest import make_run_spec


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    """Patch-like features: a few tight clusters, so pruning has something to skip."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, dim, generator=g) * 4
    return centers[torch.randint(12, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def anomalib_indices(embedding: torch.Tensor, ratio: float, seed: int) -> list[int]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return list(KCenterGreedy(embedding=embedding, sampling_ratio=ratio).select_coreset_idxs())


def harness_indices(embedding: torch.Tensor, ratio: float, seed: int) -> list[int]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return greedy_coreset(embedding, anomalib_draws(embedding, ratio))


@pytest.mark.parametrize(
    ("n", "dim", "ratio", "seed"),
    [(2000, 384, 0.1, 0), (2000, 384, 0.1, 1), (3000, 64, 0.25, 2), (500, 16, 1.0, 3), (1200, 384, 0.01, 4)],
)
def test_same_indices_as_anomalib(n: int, dim: int, ratio: float, seed: int) -> None:
    embedding = clustered(n, dim, seed)
    assert harness_indices(embedding, ratio, seed) == anomalib_indices(embedding, ratio, seed)


def test_same_indices_on_structureless_features() -> None:
    """Gaussian noise: almost nothing can be pruned, the answer must still be anomalib's."""
    embedding = torch.randn(1500, 128, generator=torch.Generator().manual_seed(7))
    assert harness_indices(embedding, 0.1, 7) == anomalib_indices(embedding, 0.1, 7)


def test_draws_leave_the_rngs_where_anomalib_leaves_them() -> None:
    embedding = clustered(1000, 64, 0)
    harness_indices(embedding, 0.1, 0)
    after_harness = (torch.rand(3), np.random.rand(3))
    anomalib_indices(embedding, 0.1, 0)
    after_anomalib = (torch.rand(3), np.random.rand(3))
    assert torch.equal(after_harness[0], after_anomalib[0])
    assert np.array_equal(after_harness[1], after_anomalib[1])


def test_an_empty_coreset_is_refused() -> None:
    with pytest.raises(ValueError, match="coreset_size must be a positive integer, got 0"):
        anomalib_draws(torch.zeros(5, 4), 0.1)


# --- seed studies: features once --------------------------------------------------------


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pretrained' ResNet-18 (fixed random weights): a backbone that is the same for every seed."""
    import torchvision

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def outcome(record: RunRecord) -> tuple[Any, ...]:
    assert record.status == "ok", record.error
    assert record.predictions is not None
    p = record.predictions
    return (p.scores_sha256, p.maps_sha256, p.model_sha256, record.metrics)


@pytest.mark.slow
def test_shared_features_give_the_records_of_separate_runs(synth_root: Path, weights_file: Path) -> None:
    args = {"pre_trained": True, "weights": str(weights_file)}
    specs = [make_run_spec("patchcore", synth_root, seed=s, model_args=args) for s in (0, 1, 2)]
    plain = [run_one(s) for s in specs]
    cache: FeatureCache = {}
    shared = [run_one(s, cache=cache) for s in specs]
    assert [outcome(r) for r in shared] == [outcome(r) for r in plain]
    assert [r.run_id for r in shared] == [r.run_id for r in plain]
    assert [r.features["reused"] for r in shared if r.features] == [False, True, True]
    again = run_one(make_run_spec("patchcore", synth_root, seed=1, repeat=1, model_args=args), cache=cache)
    assert again.features is not None
    assert again.features["reused"] is False  # another repeat: extracted anew
    assert outcome(again)[:3] == outcome(plain[1])[:3]
    assert len({r.features["key"] for r in shared if r.features}) == 1
    assert all(r.features is None for r in plain)
    assert len({outcome(r)[0] for r in plain}) == 3  # the seed still moves the coreset

    # anomalib's own sampler picks the same coreset, so the same scores.
    anomalib = run_one(make_run_spec("patchcore", synth_root, seed=1, model_args={**args, "coreset": "anomalib"}))
    assert outcome(anomalib)[:3] == outcome(plain[1])[:3]
    assert anomalib.params["model_args"]["coreset"] == "anomalib"
    assert plain[1].params["model_args"]["coreset"] == "harness"


@pytest.mark.slow
def test_memory_safe_mode_keeps_the_embedding_on_the_host_with_the_same_numbers_on_cpu(
    synth_root: Path, weights_file: Path
) -> None:
    args = {"pre_trained": True, "weights": str(weights_file)}
    base = run_one(make_run_spec("patchcore", synth_root, seed=0, model_args=args))
    safe = run_one(make_run_spec("patchcore", synth_root, seed=0, model_args={**args, "memory_safe": True}))
    assert outcome(safe)[:3] == outcome(base)[:3]  # on the CPU both draw from the same RNG


def test_a_random_backbone_shares_nothing(synth_root: Path) -> None:
    from harness.models import get_model

    adapter = get_model("patchcore")
    assert not adapter.shares_features(adapter.Args(pre_trained=False))
    assert adapter.shares_features(adapter.Args(pre_trained=True))
    assert not get_model("ganomaly").shares_features(get_model("ganomaly").Args())


@pytest.mark.slow
def test_a_seed_sweep_extracts_features_once_per_category(
    tmp_path: Path, synth_root: Path, weights_file: Path, ray_tmp: Path
) -> None:
    from tests.test_sweep import SMOKE, records, sweep_cli, write_spec

    args = {"backbone": "resnet18", "layers": ["layer2", "layer3"], "pre_trained": True, "weights": str(weights_file)}
    spec = write_spec(tmp_path / "s.yaml", SMOKE, data__root=str(synth_root), model_args=args, seeds=[0, 1])
    out = sweep_cli(spec, tmp_path / "results")
    assert out.returncode == 0, out.stderr
    recs = records(tmp_path / "results")
    assert len(recs) == 8  # 2 categories x 2 seeds x 2 repeats
    for category in ("weave", "disc"):
        mine = [r for r in recs if r["category"] == category]
        # Each repeat extracts its own (so repeats still test extraction), shared over the seeds.
        assert sorted((r["repeat"], r["features"]["reused"]) for r in mine) == [
            (0, False),
            (0, True),
            (1, False),
            (1, True),
        ]
        assert len({r["features"]["key"] for r in mine}) == 2
        by_seed = {(r["seed"], r["repeat"]): r["predictions"]["scores_sha256"] for r in mine}
        assert by_seed[(0, 0)] == by_seed[(0, 1)]
        assert by_seed[(1, 0)] == by_seed[(1, 1)]
        assert by_seed[(0, 0)] != by_seed[(1, 0)]
    # A reused-features run is the run `harness run` would have made alone.
    reused = next(r for r in recs if r["category"] == "disc" and r["features"]["reused"] and r["seed"] == 1)
    alone = run_one(make_run_spec("patchcore", synth_root, seed=1, repeat=reused["repeat"], model_args=args))
    assert alone.predictions is not None
    assert alone.predictions.scores_sha256 == reused["predictions"]["scores_sha256"]
    assert alone.predictions.model_sha256 == reused["predictions"]["model_sha256"]
