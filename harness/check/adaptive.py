"""Adaptive seed studies: where a group stands in its rounds, from its per-seed values alone.

The sweep driver decides the next round here and the checker says how a group ended here, so
a rerun of a killed sweep re-derives the rounds it made from the store, and the report's
verdict is the one the driver acted on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from harness.check.stats import Stat, bootstrap_means
from harness.record import SeedsPlan

Outcome = Literal["reached the target", "stopped at the maximum", "in progress"]
REACHED: Outcome = "reached the target"
AT_MAX: Outcome = "stopped at the maximum"
IN_PROGRESS: Outcome = "in progress"


@dataclass(frozen=True)
class Step:
    """A group's place in its rounds: the seeds it has (or is due to have), the CI
    half-width over its last complete round (None: no round complete yet), and the outcome."""

    seeds: int
    halfwidth: float | None
    outcome: Outcome

    @property
    def due(self) -> bool:
        """Whether seeds 0 .. seeds-1 still need runs: the round is not complete."""
        return self.outcome == IN_PROGRESS


def halfwidth(values: Sequence[float]) -> float:
    """Half the width of the checker's CI of the mean (``bootstrap_means``); infinite when it
    is undefined (a value is not finite), so such a group never counts as narrow enough."""
    stat = Stat(np.asarray(values, dtype=np.float64), np.arange(len(values)))
    bootstrap_means([stat])
    if stat.ci_low is None or stat.ci_high is None or not math.isfinite(stat.ci_high - stat.ci_low):
        return math.inf
    return (stat.ci_high - stat.ci_low) / 2


def outcome(seeds: int, width: float, plan: SeedsPlan) -> Outcome:
    """How a complete round of ``seeds`` with CI half-width ``width`` ends the group, if it does."""
    if width <= plan.ci_halfwidth:
        return REACHED
    return AT_MAX if seeds >= plan.max else IN_PROGRESS


def next_step(values: Mapping[int, float], plan: SeedsPlan) -> Step:
    """Walk the rounds (``min`` seeds, then ``round`` more up to ``max``) over the seeds that
    have a value: the first round whose seeds are not all there is due; a round narrow enough,
    or at ``max``, ends the group. Seeds are 0, 1, 2, ...: round k is seeds 0 .. n_k-1."""
    n, width = plan.min, None
    while all(s in values for s in range(n)):
        width = halfwidth([values[s] for s in range(n)])
        ended = outcome(n, width, plan)
        if ended != IN_PROGRESS:
            return Step(n, width, ended)
        n = min(n + plan.round, plan.max)
    return Step(n, width, IN_PROGRESS)


def status(values: Mapping[int, float], plan: SeedsPlan) -> dict[str, Any]:
    """A group's adaptive status as ``harness check --json`` writes it (docs/check-json.md)."""
    step = next_step(values, plan)
    done = step.seeds if not step.due else sum(s in values for s in range(step.seeds))
    return {
        "metric": plan.metric,
        "target": plan.ci_halfwidth,
        "min": plan.min,
        "max": plan.max,
        "round": plan.round,
        "seeds": done,
        "halfwidth": step.halfwidth,
        "outcome": step.outcome,
    }
