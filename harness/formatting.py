"""Text shared by every output: tables, numbers, durations, and the one way to name a run.

The checker's terminal table, the markdown report, the CLI, sweep progress and W&B all say
the same things the same way, so each is written once, here. Nothing here computes a number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

GIB = 2**30


class Spread(Protocol):
    """A metric over seeds, as the checker's ``Stat`` gives it."""

    values: np.ndarray
    ci_low: float | None
    ci_high: float | None

    @property
    def n(self) -> int: ...
    @property
    def mean(self) -> float: ...
    @property
    def std(self) -> float | None: ...
    @property
    def cv(self) -> float | None: ...


class Nameable(Protocol):
    """A run spec, a run record or the checker's view of one: what names a run."""

    @property
    def model(self) -> str: ...
    @property
    def category(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def repeat(self) -> int: ...
    @property
    def role(self) -> str: ...
    @property
    def variant(self) -> str | None: ...
    @property
    def selection(self) -> dict[str, Any] | None: ...


def config_label(config: dict[str, Any]) -> str:
    """A trial's sampled values, short: ``latent_vec_size=8,lr=0.00121``."""
    return ",".join(f"{k.split('.')[-1]}={f'{v:.3g}' if isinstance(v, float) else v}" for k, v in config.items())


def run_name(run: Nameable) -> str:
    """``patchcore disc seed=0 r1``; ``... best`` for a selected configuration's run; a trial
    is named by its sampled values: ``ganomaly disc trial lr=0.00121,n_features=16``; a run
    in one of the study's named environments ends ``in aten-default``."""
    where = f" in {run.variant}" if run.variant else ""
    if run.role == "trial":
        return f"{run.model} {run.category} trial {config_label((run.selection or {}).get('config') or {})}{where}"
    name = f"{run.model} {run.category} seed={run.seed} r{run.repeat}"
    return f"{name} best{where}" if run.role == "best" else name + where


def fmt_duration(seconds: float) -> str:
    """``3m05s``: progress ETAs, stage clocks."""
    secs = max(0, int(seconds))
    return f"{secs // 60}m{secs % 60:02d}s"


def fmt_metrics(metrics: dict[str, float | None]) -> str:
    """``image_AUROC=0.7422 pixel_AUROC=0.7799``: a run's metrics on one line, sorted."""
    return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if v is not None)


def fmt_value(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt_small(x: float | None) -> str:
    """A difference that is usually 0 or tiny: ``0``, ``3.1e-07``."""
    return "-" if x is None else ("0" if x == 0 else f"{x:.2g}")


def fmt_ints(values: Iterable[int]) -> str:
    """``0-29`` for a run of consecutive integers, else ``0, 2, 5``."""
    v = sorted(set(values))
    if not v:
        return "-"
    return f"{v[0]}-{v[-1]}" if len(v) > 2 and v == list(range(v[0], v[-1] + 1)) else ", ".join(map(str, v))


def fmt_stat(stat: Spread | None, digits: int = 3) -> str:
    """``mean±std [lo, hi]``; a single seed says so instead of a std of 0."""
    if stat is None:
        return "-"
    if stat.n == 1:
        return f"{stat.mean:.{digits}f} (1 seed)"
    ci = f" [{stat.ci_low:.{digits}f}, {stat.ci_high:.{digits}f}]" if stat.ci_low is not None else ""
    return f"{stat.mean:.{digits}f}±{stat.std:.{digits}f}{ci}"


def stat_cells(stat: Spread | None) -> tuple[str, str, str, str]:
    """A metric's spread as table cells: mean ± std, 95% CI, min-max, CV."""
    if stat is None:
        return "-", "-", "-", "-"
    mean = f"{stat.mean:.3f}" + (" (1 seed)" if stat.std is None else f" ± {stat.std:.3f}")
    ci = "-" if stat.ci_low is None else f"[{stat.ci_low:.3f}, {stat.ci_high:.3f}]"
    spread = f"{stat.values.min():.3f}-{stat.values.max():.3f}"
    cv = "-" if stat.cv is None else f"{100 * stat.cv:.2f}%"
    return mean, ci, spread, cv


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart (the terminal's tables)."""
    table = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A GitHub markdown table (pipes in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)]


def flatten(d: dict[str, Any], prefix: str = "", keep_empty: bool = False) -> dict[str, Any]:
    """Nested dicts as one level of dotted keys, the way ``--set`` names them; lists stay
    values. ``keep_empty``: an empty dict stays a value (a table's column), not nothing."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and (v or not keep_empty):
            out.update(flatten(v, f"{prefix}{k}.", keep_empty))
        else:
            out[f"{prefix}{k}"] = v
    return out
