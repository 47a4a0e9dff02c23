"""Named random streams: what a run's seed drives, one source of variance at a time.

A run draws random numbers for several things: the model's initial weights (``init``), the
order of its training images (``order``), PatchCore's coreset (``sampling``) and, for a
search trial, which held-out images get synthetic anomalies and the anomalies themselves
(``split``). With nothing pinned, one seed drives one sequence of draws, exactly as before
streams existed (run ids and numbers unchanged). A spec that pins a stream (``streams:
{init: 0}``) gives each stream its own generator, seeded from a hash of its name and its
seed: the pinned ones from their value, the others from the run's seed. Then varying the
seed moves only the streams that follow it (Bouthillier et al., MLSys 2021).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

STREAMS = ("init", "order", "sampling", "split")
FOLLOW = "seed"  # a stream's value when it follows the run's seed
DATA_SPLIT_SEED = 0  # held-out images (normal_split_ratio, a trial's split) unless pinned


def derived(name: str, seed: int) -> int:
    """The generator seed of stream ``name`` at ``seed``: independent of every other stream's."""
    return int.from_bytes(hashlib.blake2b(f"{name}:{seed}".encode(), digest_size=4).digest(), "big")


@contextlib.contextmanager
def fixed_rng(seed: int) -> Iterator[None]:
    """Draw from RNGs seeded with ``seed`` inside, and leave the run's own RNG states as they were."""
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


@dataclass(frozen=True)
class Streams:
    """Each stream's seed for one run, and whether they draw apart (``separate``: a stream is pinned)."""

    seeds: dict[str, int]
    separate: bool

    @classmethod
    def of(cls, seed: int, streams: tuple[str, ...], pins: dict[str, int | str] | None) -> Streams:
        """``streams``: the model's (and a trial's ``split``); ``pins``: the spec's, stream to value."""
        pins = pins or {}
        seeds = {name: seed if pins.get(name, FOLLOW) == FOLLOW else int(pins[name]) for name in streams}
        if "split" in streams and "split" not in pins:
            seeds["split"] = DATA_SPLIT_SEED  # trials are compared on one split
        return cls(seeds, any(pins.get(name, FOLLOW) != FOLLOW for name in streams if name != "split"))

    @contextlib.contextmanager
    def drawing(self, name: str) -> Iterator[None]:
        """Draws inside come from stream ``name`` (with nothing pinned: from the run's one sequence)."""
        if name == "split":  # always its own: every trial of a search is scored on one split
            with fixed_rng(self.seeds[name]):
                yield
        elif self.separate and name in self.seeds:
            with fixed_rng(derived(name, self.seeds[name])):
                yield
        else:
            yield

    def generator(self, name: str) -> torch.Generator | None:
        """A torch generator for stream ``name`` when streams draw apart, else None (the global RNG)."""
        if not (self.separate and name in self.seeds):
            return None
        import torch

        return torch.Generator().manual_seed(derived(name, self.seeds[name]))
