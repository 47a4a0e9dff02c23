"""Variance by source: how much of a metric's seed spread one random stream makes on its own.

A ``sources`` study (docs/specs.md) runs the study once as written (the reference: every
stream it does not pin follows the seed) and once per listed stream with only that stream
following the seed, the others pinned. Per source, the checker compares the variance over
seeds with that stream alone to the reference's: the share ``var(source) / var(reference)``,
with the 95% interval of a ratio of two normal variances (the F interval; exact when the
metric is normal over seeds, checked by simulation in tests/test_sources.py). Shares need not
add up to one: sources interact, and each share is estimated from few seeds.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.check.load import settings_id
from harness.streams import FOLLOW

if TYPE_CHECKING:
    from harness.check.groups import Group
    from harness.check.load import Store

LEVEL = 0.95
METRICS = ("image_AUROC", "pixel_AUROC")  # as comparisons and aggregates (groups.COMPARED)


def pins_of(params: dict[str, Any]) -> dict[str, Any]:
    """A group's pinned streams (``params.streams``; empty: every stream follows the seed)."""
    pins = params.get("streams")
    return pins if isinstance(pins, dict) else {}


def only_source(pins: dict[str, Any]) -> str | None:
    """The one stream that follows the seed in a source study's group, else None."""
    varied = [name for name, value in pins.items() if value == FOLLOW]
    return varied[0] if len(varied) == 1 else None


def stream_tag(pins: dict[str, Any]) -> str:
    """What a group's label adds for its streams: `` [sampling only]``, `` [init=0 pinned]``."""
    if not pins:
        return ""
    source = only_source(pins)
    if source is not None:
        return f" [{source} only]"
    return " [" + ", ".join(f"{k}={v}" for k, v in sorted(pins.items()) if v != FOLLOW) + " pinned]"


def base_config(params: dict[str, Any]) -> str:
    """The settings' id without the streams: a source study's groups and their reference share it."""
    return settings_id({k: v for k, v in params.items() if k != "streams"})[0]


def variance_ratio_interval(
    var_a: float, n_a: int, var_b: float, n_b: int, level: float = LEVEL
) -> tuple[float, float]:
    """The ``level`` interval of ``sigma_a^2 / sigma_b^2`` from two independent normal samples
    of sizes ``n_a`` and ``n_b`` with sample variances ``var_a`` and ``var_b``."""
    from scipy.stats import f

    ratio, alpha = var_a / var_b, 1 - level
    df = (n_a - 1, n_b - 1)
    return ratio / float(f.ppf(1 - alpha / 2, *df)), ratio / float(f.ppf(alpha / 2, *df))


@dataclass(frozen=True)
class SourceShare:
    """One stream's own seed variance of one metric, against the reference group's."""

    sweep: str
    model: str
    category: str
    label: str  # the reference group's (its view's) label
    metric: str
    source: str
    n: int
    std: float
    n_reference: int
    std_reference: float
    share: float | None  # var(source) / var(reference); None when the reference does not vary
    share_low: float | None
    share_high: float | None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def shares(views: list[Group], store: Store) -> list[SourceShare]:
    """Per reference view (a group with no stream following the seed alone) and quality metric,
    each source study's share of its seed variance; the groups must have 2 seeds or more."""
    by_base: dict[tuple[Any, ...], list[Group]] = defaultdict(list)
    for v in views:
        params = store.params[v.config_id]
        by_base[(v.sweep, v.model, v.category, v.role, base_config(params), tuple(v.environments))].append(v)
    out = []
    for members in by_base.values():
        sources = {s: v for v in members if (s := only_source(pins_of(store.params[v.config_id])))}
        references = [v for v in members if only_source(pins_of(store.params[v.config_id])) is None]
        if not sources or len(references) != 1:
            continue
        ref = references[0]
        for metric in METRICS:
            out += [_share(ref, name, v, metric) for name, v in sorted(sources.items()) if _both(ref, v, metric)]
    return out


def _both(ref: Group, source: Group, metric: str) -> bool:
    return all(metric in g.stats and g.stats[metric].n > 1 for g in (ref, source))


def _share(ref: Group, name: str, source: Group, metric: str) -> SourceShare:
    a, b = source.stats[metric], ref.stats[metric]
    std_a, std_b = (float(s.std or 0.0) if np.ptp(s.values) else 0.0 for s in (a, b))  # no rounding noise
    share = low = high = None
    if std_b > 0:
        share = std_a**2 / std_b**2
        low, high = variance_ratio_interval(std_a**2, a.n, std_b**2, b.n)
    return SourceShare(
        ref.sweep, ref.model, ref.category, ref.label, metric, name, a.n, std_a, b.n, std_b, share, low, high
    )
