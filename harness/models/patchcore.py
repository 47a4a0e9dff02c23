"""PatchCore (Roth et al., 2022) through anomalib, with a ResNet-18 backbone by default."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from harness.errors import HarnessError
from harness.models import ModelArgs, SharedFeatures, register_model

if TYPE_CHECKING:
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from torch import nn

    from harness.streams import Streams

Layer = Literal["layer1", "layer2", "layer3", "layer4"]


class PatchcoreArgs(ModelArgs):
    backbone: Literal["resnet18"] = "resnet18"
    layers: list[Layer] = Field(default=["layer2", "layer3"], min_length=1)
    pre_trained: bool = True
    # A local state dict of the pretrained backbone (torchvision or timm ResNet-18 keys), for
    # clusters without internet; loaded with weights_only=True instead of fetching from the hub.
    weights: str | None = None
    coreset_sampling_ratio: float = Field(default=0.1, gt=0, le=1)
    num_neighbors: int = Field(default=9, ge=1)
    # The coreset sampler: the harness's (the same indices as anomalib's, several times
    # faster; harness/coreset.py) or anomalib's own KCenterGreedy, for strict comparability.
    coreset: Literal["harness", "anomalib"] = "harness"
    # Limited GPUs: the training embedding is kept on the host and the coreset chosen there;
    # the GPU holds the backbone, one batch and the memory bank (the coreset), never the
    # whole embedding. The start index is then drawn from the CPU's RNG: other numbers.
    memory_safe: bool = False

    @model_validator(mode="after")
    def _weights_are_pretrained(self) -> PatchcoreArgs:
        if self.weights and not self.pre_trained:
            raise ValueError("weights is a pretrained backbone: it needs pre_trained=true")
        return self


_WAYS_OUT = (
    "set model_args.pre_trained=false (random backbone), or model_args.weights=PATH "
    "(a local ResNet-18 state dict, e.g. torchvision's resnet18-f37072fd.pth)"
)


def load_backbone_weights(backbone: str, path: str) -> nn.Module:
    """A torchvision ResNet with the file's weights; any mismatch is a one-line error."""
    import torch
    import torchvision

    file = Path(path)
    if not file.is_file():
        raise HarnessError(f"model_args.weights: no such file {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-checkpoint file
        raise HarnessError(
            f"model_args.weights: {file} is not a torch weights file ({exc.__class__.__name__})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    module = getattr(torchvision.models, backbone)(weights=None)
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise HarnessError(f"model_args.weights: {file} does not fit {backbone}: {first}") from None
    return module


def cached_hub_weights(backbone: str) -> str | None:
    """The local file of timm's pretrained weights for ``backbone``, if the hub cache has it."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(backbone)
    repo = cfg.hf_hub_id if cfg else None
    if not repo:
        raise HarnessError(f"timm knows no pretrained weights for {backbone}; {_WAYS_OUT}")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def ensure_pretrained_reachable(backbone: str) -> bool:
    """Fail fast, naming the ways out, when pretrained weights can be neither read nor fetched.

    Without this timm retries the hub for about a minute before failing. Returns whether the
    weights are already in the local cache (then the build runs with the hub offline).
    """
    if cached_hub_weights(backbone):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set and they are not in the local cache"
    else:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
            return False
        except OSError:
            reason = "huggingface.co cannot be reached"
    raise HarnessError(f"pretrained {backbone} weights unavailable: {reason}; {_WAYS_OUT}")


@contextlib.contextmanager
def hub_offline(enabled: bool) -> Iterator[None]:
    """Keep timm off the network while it loads cached weights.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, so the flag is set on its
    constants module, not in the environment.
    """
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


class _HostList(list[Any]):
    """``embedding_store`` for ``memory_safe``: each batch's embedding goes to the host at once."""

    def append(self, item: Any) -> None:
        super().append(item.cpu())


def install_sampler(
    torch_model: Any, args: PatchcoreArgs, features: SharedFeatures | None, streams: Streams | None = None
) -> None:
    """Replace ``PatchcoreModel.subsample_embedding``: the coreset of ``args.coreset``, from the
    shared embedding when an earlier run extracted it (this run then trained on one batch
    only), else from this run's, which it leaves for the next runs; its random projection and
    start index come from the ``sampling`` stream."""
    import contextlib

    import torch

    if args.memory_safe:
        torch_model.embedding_store = _HostList()

    def subsample_embedding(sampling_ratio: float, embeddings: torch.Tensor | None = None) -> None:
        from harness.coreset import anomalib_draws, greedy_coreset

        device = torch_model.memory_bank.device
        if features is not None and features.embedding is not None:  # in this run's image order
            assert features.order is not None
            embedding = features.embedding[features.order].flatten(0, 1)
            embedding = embedding if args.memory_safe else embedding.to(device)
        else:
            embedding = torch.vstack(torch_model.embedding_store)
            if features is not None:  # kept in dataset order: one block of rows per image
                assert features.order is not None
                blocks = embedding.cpu().unflatten(0, (len(features.order), -1))
                features.embedding = blocks[torch.argsort(torch.tensor(features.order))]
        torch_model.embedding_store.clear()
        drawing = streams.drawing("sampling") if streams else contextlib.nullcontext()
        if args.coreset == "anomalib":
            from anomalib.models.components import KCenterGreedy

            with drawing:
                coreset = KCenterGreedy(embedding=embedding, sampling_ratio=sampling_ratio).sample_coreset()
        else:
            with drawing:
                draws = anomalib_draws(embedding, sampling_ratio)
            coreset = embedding[greedy_coreset(embedding, draws)]
        torch_model.memory_bank = coreset.to(device)

    torch_model.subsample_embedding = subsample_embedding


@register_model("patchcore")
class Patchcore:
    Args = PatchcoreArgs
    anomaly_maps = True
    streams = ("init", "order", "sampling")

    def check(self, args: PatchcoreArgs) -> None:
        if args.weights:
            load_backbone_weights(args.backbone, args.weights)
        elif args.pre_trained:
            ensure_pretrained_reachable(args.backbone)

    def build(
        self,
        args: PatchcoreArgs,
        *,
        pre_processor: PreProcessor,
        post_processor: PostProcessor,
        train_batch_size: int,
        features: SharedFeatures | None = None,
        streams: Streams | None = None,
    ) -> Any:
        import torch
        from anomalib.models import Patchcore as AnomalibPatchcore

        backbone: str | nn.Module = args.backbone
        cached = False
        if args.weights:
            backbone = load_backbone_weights(args.backbone, args.weights)
        elif args.pre_trained:
            cached = ensure_pretrained_reachable(args.backbone)
        with hub_offline(cached):
            model = AnomalibPatchcore(
                backbone=backbone,  # type: ignore[arg-type]  # anomalib accepts an nn.Module
                layers=args.layers,
                pre_trained=args.pre_trained and not args.weights,  # a module arrives with its weights
                coreset_sampling_ratio=args.coreset_sampling_ratio,
                num_neighbors=args.num_neighbors,
                pre_processor=pre_processor,
                post_processor=post_processor,
                evaluator=False,
                visualizer=False,
            )
        install_sampler(model.model, args, features, streams)
        if features is not None and features.embedding is not None:
            # The features are there: the one training batch needs no forward pass (it draws
            # no random numbers either, so skipping it changes nothing else).
            def no_forward(*_: Any, **__: Any) -> torch.Tensor:
                return torch.tensor(0.0, requires_grad=True, device=model.device)

            model.training_step = no_forward  # type: ignore[method-assign,assignment]
        return model

    def shares_features(self, args: PatchcoreArgs) -> bool:
        return args.pre_trained  # a random backbone is drawn from the seed

    def weights_file(self, args: PatchcoreArgs) -> str | None:
        if args.weights:
            return args.weights
        return cached_hub_weights(args.backbone) if args.pre_trained else None

    def max_epochs(self, args: PatchcoreArgs) -> int:
        return 1
