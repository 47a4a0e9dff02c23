from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torchvision

from harness.errors import HarnessError
from harness.models import get_model, known_models, register_model
from harness.models.patchcore import ensure_pretrained_reachable, load_backbone_weights


def test_registry_knows_both_models_and_rejects_duplicates() -> None:
    assert known_models() == ["ganomaly", "patchcore"]
    with pytest.raises(ValueError, match="already registered"):
        register_model("patchcore")(type("Dup", (), {}))
    with pytest.raises(HarnessError, match="unknown model 'fastflow'; known: ganomaly, patchcore"):
        get_model("fastflow")


def test_weights_file_loads_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    module = load_backbone_weights("resnet18", str(path))
    assert torch.equal(module.layer2[0].conv1.weight, src.layer2[0].conv1.weight)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"garbage", "is not a torch weights file"),
        ({"conv1.weight": torch.zeros(1)}, "does not fit resnet18"),
    ],
)
def test_bad_weights_file(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(HarnessError, match=message):
        load_backbone_weights("resnet18", str(path))


def test_pretrained_without_hub_fails_fast_naming_the_ways_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine has
    t0 = time.perf_counter()
    with pytest.raises(HarnessError) as err:
        ensure_pretrained_reachable("resnet18")
    assert time.perf_counter() - t0 < 5
    assert "model_args.pre_trained=false" in str(err.value)
    assert "model_args.weights=PATH" in str(err.value)
