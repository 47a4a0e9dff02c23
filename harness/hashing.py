"""Stable ids: the same settings hash to the same id on every machine and Python version."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short SHA-256 of canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def float32_sha256(values: Any) -> str:
    """SHA-256 of values as contiguous float32 bytes: how a run hashes its scores and maps, and
    how the checker verifies them."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (PatchCore's memory bank included)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + b"\0")
        t = tensor.detach().cpu().contiguous()
        # numpy has no bfloat16 (a bf16 autocast run may keep some): its bits, as int16.
        digest.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return digest.hexdigest()
