"""Model registry: adding a model is one new module in this package.

Each module registers an adapter with ``@register_model("name")``. Adapters import anomalib
only inside ``build``, so listing or validating models stays cheap (no 8 s import).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from harness.errors import HarnessError

if TYPE_CHECKING:
    import torch
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor

    from harness.streams import Streams


class SharedFeatures:
    """A training embedding that does not depend on the seed, extracted by the first run of a
    seed study that needs it and reused by the others (``key``: what it depends on).

    The embedding is kept in dataset order, one block of rows per image. A run's own order of
    training images (its shuffle, drawn from its seed) is recorded in ``order`` as it starts
    training, and the embedding is handed to it in that order: exactly what the run would have
    extracted itself.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.embedding: torch.Tensor | None = None  # (images, rows per image, dims), on the host
        self.order: list[int] | None = None  # the current run's order of training images


class ModelArgs(BaseModel):
    """Base of every model's arguments: strict, so a misspelt key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelAdapter(Protocol):
    """What the run needs from a model: its arguments, how to build it, how long to train."""

    Args: type[ModelArgs]
    anomaly_maps: bool  # whether it scores pixels too (pixel metrics need it)
    streams: tuple[str, ...]  # the random streams its training draws from (harness/streams.py)

    def check(self, args: Any) -> None:
        """Fail fast, before the 8 s anomalib import, on what training would trip over."""
        ...

    def build(
        self,
        args: Any,
        *,
        pre_processor: PreProcessor,
        post_processor: PostProcessor,
        train_batch_size: int,
        features: SharedFeatures | None = None,
        streams: Streams | None = None,
    ) -> Any:
        """The anomalib module, with the harness's shared pre- and post-processing (and, where
        the model can use them, training features extracted once for several runs); draws it
        makes after this call (PatchCore's coreset) come from their named ``streams``."""
        ...

    def shares_features(self, args: Any) -> bool:
        """Whether the training features are the same for every seed (a fixed backbone)."""
        ...

    def weights_file(self, args: Any) -> str | None:
        """The local file of pretrained weights the model loads (after a run: also from the hub cache)."""
        ...

    def max_epochs(self, args: Any) -> int:
        """Epochs for Engine.fit."""
        ...


_REGISTRY: dict[str, ModelAdapter] = {}
_discovered = False
A = TypeVar("A")


def register_model(name: str) -> Any:
    """Class decorator: register an adapter under ``name``; a second one is an error."""

    def deco(cls: type[A]) -> type[A]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = cls()  # type: ignore[assignment]
        return cls

    return deco


def _discover() -> None:
    global _discovered
    if not _discovered:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _discovered = True


def known_models() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_model(name: str) -> ModelAdapter:
    """The adapter for ``name``, or an error that lists the known names."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise HarnessError(f"unknown model {name!r}; known: {', '.join(known_models())}") from None
