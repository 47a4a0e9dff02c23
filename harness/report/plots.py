"""The report's figures: their data gathered from the checker's answer, then drawn as PNG bytes.

Each figure is two steps. ``seeds_figure``, ``search_figure``, ``score_diff_figure`` and
``profile_figure`` read the checker's objects into a ``Plot``: named tuples of strings, numbers and numpy arrays.
``draw`` makes the PNG from that alone, so the data is all a worker process needs and all the
figure cache keys on (``plot_key``). The same data gives the same bytes: no timestamps.

Shapes are drawn as a few collections per panel rather than matplotlib's artists per box or
line, which took seconds a figure for a store of 300 groups.
"""

from __future__ import annotations

import functools
import hashlib
import io
import multiprocessing
import os
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import numpy as np

from harness.check.pairs import aligned_scores

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from harness.check import Group, Search
    from harness.check.across import Aggregate
    from harness.check.pairs import CrossEnvironment

PLOTTED = ("image_AUROC", "pixel_AUROC")
SEEDS_IN_LEGEND = 10  # up to this many seeds (fewer in a narrow figure), each its colour and legend entry
LOG_DIFF_EDGES = np.arange(-12, 1.01, 0.5)  # 1e-12 .. 10, half a decade a bin
# A worker process takes a second or so to start (Python, numpy, matplotlib); a panel takes a
# tenth of one to draw or more. Below this many panels, drawing them all here is done sooner.
WORKER_PANELS = 40


class Box(NamedTuple):
    """One model's values of a metric in one category, by seed."""

    label: str
    values: np.ndarray
    seeds: np.ndarray


class SeedsFigure(NamedTuple):
    metric: str
    panels: list[tuple[str, list[Box]]]  # (category, its boxes), by category


class SearchPanel(NamedTuple):
    title: str
    metric: str
    lost: list[np.ndarray]  # each trial's (epoch, value) rows
    won: list[np.ndarray]


class SearchFigure(NamedTuple):
    title: str
    panels: list[SearchPanel]


class ScoreDiffPanel(NamedTuple):
    title: str
    log_moved: np.ndarray  # log10 |score difference| of the images whose score moved


class ScoreDiffFigure(NamedTuple):
    panels: list[ScoreDiffPanel]


class Profile(NamedTuple):
    """One model's scores of a metric over every category and seed it ran, ascending."""

    label: str
    values: np.ndarray


class ProfileFigure(NamedTuple):
    panels: list[tuple[str, list[Profile]]]  # (metric, its models), by metric


Plot = SeedsFigure | SearchFigure | ScoreDiffFigure | ProfileFigure


def seeds_figure(by_label: dict[str, list[Group]], metric: str) -> SeedsFigure:
    cells: dict[str, list[Box]] = defaultdict(list)
    for label, groups in by_label.items():
        for g in groups:
            if metric in g.stats:
                cells[g.category].append(Box(label, g.stats[metric].values, g.stats[metric].seeds))
    return SeedsFigure(metric, sorted(cells.items()))


def search_figure(searches: list[Search]) -> SearchFigure:
    panels = []
    for search in searches:
        selections = [g.selection for g in search.best if g.selection]
        winners = {str(sel.get("trial_run_id")) for sel in selections}
        metric = next(
            (str(sel.get("metric")) for sel in selections),
            next((k for t in search.trials for k in t.curve or {} if k.startswith("val_")), "val"),
        )
        lost: list[np.ndarray] = []
        won: list[np.ndarray] = []
        for t in sorted(search.trials, key=lambda t: t.run_id):
            curve = t.curve or {}
            epochs, values = curve.get("epoch", []), curve.get(metric, [])
            points = [(e, v) for e, v in zip(epochs, values, strict=False) if e is not None and v is not None]
            if points:
                (won if t.run_id in winners else lost).append(np.array(points, dtype=float))
        where = f" in {search.variant}" if search.variant else ""
        panels.append(SearchPanel(f"{search.category}{where}: {len(search.trials)} trials", metric, lost, won))
    title = f"{searches[0].sweep}/{searches[0].model}: trials' validation curves, winner red"
    return SearchFigure(title, panels)


def score_diff_figure(crosses: list[CrossEnvironment]) -> ScoreDiffFigure:
    """A panel per pair of environments (by their ids) that scored the same images; none if no pair did."""
    by_pair: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    names: dict[tuple[str, str], str] = {}
    for c in crosses:
        key = (c.a.environment_id, c.b.environment_id)
        names[key] = f"{c.a.variant or c.a.environment_id} vs {c.b.variant or c.b.environment_id}"
        for p in c.pairs:
            aligned = aligned_scores(p.a, p.b)
            if aligned is not None:
                by_pair[key].append(np.abs(aligned[0] - aligned[1]))
    panels = []
    for key in sorted(by_pair):
        values = np.concatenate(by_pair[key])
        title = f"{names[key]}: {len(values)} images, {int(np.sum(values == 0))} equal"
        panels.append(ScoreDiffPanel(title, np.log10(values[values > 0])))
    return ScoreDiffFigure(panels)


def profile_figure(aggregates: list[Aggregate]) -> ProfileFigure:
    """A panel per metric, a curve per model: the runs the checker aggregated across categories."""
    panels: dict[str, list[Profile]] = defaultdict(list)
    for a in aggregates:
        panels[a.metric].append(Profile(a.label, np.sort(np.concatenate(a.values))))
    return ProfileFigure(sorted(panels.items()))


def _figure(n_panels: int, width: float = 4.0, sharey: bool = False, legend: bool = False) -> tuple[Any, list[Axes]]:
    """Panels in rows of three; ``legend`` keeps a line under the title free for one."""
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = -(-n_panels // cols)
    head = 0.8 if legend else 0.5
    w, h = width * cols, 3.2 * rows + head - 0.1
    fig = Figure(figsize=(w, h), dpi=100)
    # Fixed margins in inches (tight_layout would draw every figure twice).
    fig.subplots_adjust(left=0.7 / w, right=1 - 0.15 / w, top=1 - head / h, bottom=0.6 / h, hspace=0.75, wspace=0.3)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _png(fig: Any) -> bytes:
    """Drawn by Agg without pyplot, so no display and no GUI backend, in any process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _draw_seeds(plot: SeedsFigure) -> bytes:
    """Per category, a box per model (quartiles, whiskers at 1.5 IQR) with every seed drawn over it.

    Every panel shares one y-axis, so categories compare at a glance; up to SEEDS_IN_LEGEND
    seeds, each seed has its own colour in every panel, named in the legend.
    """
    from matplotlib.collections import LineCollection, PolyCollection

    metric = plot.metric
    seeds = sorted({int(s) for _, boxes in plot.panels for box in boxes for s in box.seeds})
    room = min(SEEDS_IN_LEGEND, 4 * min(len(plot.panels), 3))  # legend entries one line of the figure holds
    colours = {s: f"C{i}" for i, s in enumerate(seeds)} if len(seeds) <= room else {}
    fig, axes = _figure(len(plot.panels), sharey=True, legend=bool(colours))
    for ax, (category, boxes) in zip(axes, plot.panels, strict=True):
        boxes_xy: list[Any] = []
        segments: list[Any] = []
        xs: list[float] = []
        ys: list[float] = []
        cs: list[str] = []
        for i, box in enumerate(boxes, start=1):
            v = box.values
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            lo = v[v >= q1 - 1.5 * (q3 - q1)].min()
            hi = v[v <= q3 + 1.5 * (q3 - q1)].max()
            boxes_xy.append([(i - 0.25, q1), (i + 0.25, q1), (i + 0.25, q3), (i - 0.25, q3)])
            segments += [[(i - 0.25, med), (i + 0.25, med)], [(i, lo), (i, q1)], [(i, q3), (i, hi)]]
            xs += list(i + (np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(1)))
            ys += list(v)
            cs += [colours.get(int(seed), "tab:blue") for seed in box.seeds]
        ax.add_collection(PolyCollection(boxes_xy, facecolors="none", edgecolors="black", linewidths=0.8))
        ax.add_collection(LineCollection(segments, colors="black", linewidths=0.8))
        ax.scatter(xs, ys, s=14, alpha=0.8, c=cs, zorder=3)
        ax.set_xlim(0.4, len(boxes) + 0.6)
        ax.autoscale_view(scalex=False)
        ax.set_xticks(range(1, len(boxes) + 1), [box.label.replace("/", "\n", 1) for box in boxes], fontsize=7)
        ax.set_title(category, fontsize=9)
        ax.set_ylabel(metric.replace("_", " "), fontsize=8)
        ax.tick_params(labelleft=True)
    if colours:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], ls="", marker="o", ms=4, color=c, label=f"seed {s}") for s, c in colours.items()]
        _, h = fig.get_size_inches()
        where = {"loc": "upper center", "bbox_to_anchor": (0.5, 1 - 0.3 / h)}
        fig.legend(handles=handles, **where, fontsize=7, ncols=len(handles), frameon=False)
    what = "coloured by seed" if colours else f"{len(seeds)} seeds"
    fig.suptitle(f"{metric.replace('_', ' ')} over seeds (points, {what}) per model and category", fontsize=10)
    return _png(fig)


def _draw_search(plot: SearchFigure) -> bytes:
    """One panel per category: every trial's validation curve in grey, the winner(s) in red."""
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(plot.panels), width=5.0)
    for ax, panel in zip(axes, plot.panels, strict=True):
        for points in panel.won:
            ax.plot(points[:, 0], points[:, 1], "-o", ms=3, lw=2.5, color="tab:red", zorder=3)
        ax.add_collection(LineCollection(panel.lost, linewidths=0.8, colors="tab:gray", alpha=0.5))
        ax.autoscale_view()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(panel.metric, fontsize=8)
        ax.set_title(panel.title, fontsize=9)
    fig.suptitle(plot.title, fontsize=10)
    return _png(fig)


def _draw_score_diff(plot: ScoreDiffFigure) -> bytes:
    """Per pair of environments: how far every test image's score moved, over every group and
    seed both ran, as a histogram of log10 |difference| (bitwise-equal scores counted apart).

    One panel per pair of environments, however many groups: a store of 300 groups in three
    environments draws three histograms, not millions of points."""
    fig, axes = _figure(len(plot.panels), width=4.5)
    edges = LOG_DIFF_EDGES
    for ax, panel in zip(axes, plot.panels, strict=True):
        ax.hist(np.clip(panel.log_moved, edges[0], edges[-1]), bins=edges.tolist(), color="tab:red", alpha=0.8)
        ax.set_xlabel("log10 |score difference| per image", fontsize=8)
        ax.set_ylabel("test images", fontsize=8)
        ax.set_title(panel.title, fontsize=8)
    fig.suptitle("Same seed, other environment: how far each test image's score moved", fontsize=10)
    return _png(fig)


def _draw_profile(plot: ProfileFigure) -> bytes:
    """Performance profiles (Agarwal et al., 2021): per model, the fraction of its category x seed
    runs scoring above each threshold tau. A curve to the right of another is better at every
    level; where they cross, which is better depends on the level asked for."""
    fig, axes = _figure(len(plot.panels), width=5.0)
    for ax, (metric, curves) in zip(axes, plot.panels, strict=True):
        lo = min(float(c.values[0]) for c in curves)
        hi = max(float(c.values[-1]) for c in curves)
        pad = 0.03 * (hi - lo) or 0.005  # each curve from 1 to 0, whatever the spread
        taus = np.linspace(lo - pad, hi + pad, 201)
        for c in curves:
            above = 1 - np.searchsorted(c.values, taus, side="right") / len(c.values)
            ax.plot(taus, above, lw=1.5, label=f"{c.label} ({len(c.values)} runs)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"{metric.replace('_', ' ')} threshold τ", fontsize=8)
        ax.set_ylabel("fraction of runs scoring above τ", fontsize=8)
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle("Performance profiles over every category and seed, per model", fontsize=10)
    return _png(fig)


_DRAWERS: dict[type, Callable[[Any], bytes]] = {
    SeedsFigure: _draw_seeds,
    SearchFigure: _draw_search,
    ScoreDiffFigure: _draw_score_diff,
    ProfileFigure: _draw_profile,
}


def draw(plot: Plot) -> bytes:
    """``plot``'s PNG from its data alone: what a worker process runs."""
    return _DRAWERS[type(plot)](plot)


def draw_all(plots: list[Plot], workers: int | None = None) -> list[bytes]:
    """Each plot's PNG, in ``workers`` processes (at most one per plot) when that is two or more:
    a figure is seconds of matplotlib, which holds the GIL. By default, one per CPU when the
    plots are worth it (``WORKER_PANELS``), else none.

    Workers are spawned, not forked: a fork copies the locks of the parent's threads (BLAS
    pools, Ray's client in a sweep) as they were, held or not. The bytes are those ``draw``
    gives here, and where no process can be started, here is where they are drawn.
    """
    n = min(workers or (_cpus() if sum(len(p.panels) for p in plots) >= WORKER_PANELS else 1), len(plots))
    if n > 1:
        try:
            with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
                return list(pool.map(draw, plots))
        except (BrokenProcessPool, OSError):  # no /dev/shm, a process limit, a worker killed
            pass
    return [draw(p) for p in plots]


def _cpus() -> int:
    """The CPUs this process may run on (a container or taskset may allow fewer than exist)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plot_key(plot: Plot) -> str:
    """The figure cache's name for ``plot``'s PNG: a hash of its kind and data, and of what
    draws it, so a change in either draws it again."""
    data = _KEY_ENCODER.encode((_drawing_code(), type(plot).__name__, plot))
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@functools.cache
def _drawing_code() -> tuple[str, ...]:
    """This file's source and the versions of the libraries that shape the bytes (Pillow writes
    matplotlib's PNGs), read from their metadata: a report of cached figures never imports matplotlib."""
    return Path(__file__).read_text(), *(version(lib) for lib in ("matplotlib", "numpy", "pillow"))


def _array_fields(obj: Any) -> Any:
    """An array as its dtype, shape and bytes: equal arrays, equal keys. Anything else is refused,
    so a value without a stable encoding (a numpy scalar, an object) cannot slip into a key."""
    if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
        return obj.dtype.str, obj.shape, np.ascontiguousarray(obj).tobytes()
    raise NotImplementedError(f"a plot's data cannot hold a {type(obj).__name__}")


_KEY_ENCODER = msgspec.msgpack.Encoder(enc_hook=_array_fields, order="deterministic")
