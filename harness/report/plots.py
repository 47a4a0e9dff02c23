"""The report's figures as PNG bytes, drawn without timestamps (the same store, the same bytes).

Shapes are drawn as a few collections per panel rather than matplotlib's artists per box or
line, which took seconds a figure for a store of 300 groups.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.check import Group, Search
from harness.check.pairs import CrossEnvironment, aligned_scores

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PLOTTED = ("image_AUROC", "pixel_AUROC")
SEEDS_IN_LEGEND = 10  # up to this many seeds (fewer in a narrow figure), each its colour and legend entry


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def seed_plot(by_label: dict[str, list[Group]], metric: str) -> bytes:
    """Per category, a box per model (quartiles, whiskers at 1.5 IQR) with every seed drawn over it.

    Every panel shares one y-axis, so categories compare at a glance; up to SEEDS_IN_LEGEND
    seeds, each seed has its own colour in every panel, named in the legend.
    """
    from matplotlib.collections import LineCollection, PolyCollection

    cells: dict[str, list[tuple[str, Group]]] = defaultdict(list)
    for label, groups in by_label.items():
        for g in groups:
            if metric in g.stats:
                cells[g.category].append((label, g))
    seeds = sorted({int(s) for boxes in cells.values() for _, g in boxes for s in g.stats[metric].seeds})
    room = min(SEEDS_IN_LEGEND, 4 * min(len(cells), 3))  # legend entries one line of the figure holds
    colours = {s: f"C{i}" for i, s in enumerate(seeds)} if len(seeds) <= room else {}
    fig, axes = _figure(len(cells), sharey=True, legend=bool(colours))
    for ax, (category, boxes) in zip(axes, sorted(cells.items()), strict=True):
        boxes_xy: list[Any] = []
        segments: list[Any] = []
        xs: list[float] = []
        ys: list[float] = []
        cs: list[str] = []
        for i, (_, g) in enumerate(boxes, start=1):
            v, s = g.stats[metric].values, g.stats[metric].seeds
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            lo = v[v >= q1 - 1.5 * (q3 - q1)].min()
            hi = v[v <= q3 + 1.5 * (q3 - q1)].max()
            boxes_xy.append([(i - 0.25, q1), (i + 0.25, q1), (i + 0.25, q3), (i - 0.25, q3)])
            segments += [[(i - 0.25, med), (i + 0.25, med)], [(i, lo), (i, q1)], [(i, q3), (i, hi)]]
            xs += list(i + (np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(1)))
            ys += list(v)
            cs += [colours.get(int(seed), "tab:blue") for seed in s]
        ax.add_collection(PolyCollection(boxes_xy, facecolors="none", edgecolors="black", linewidths=0.8))
        ax.add_collection(LineCollection(segments, colors="black", linewidths=0.8))
        ax.scatter(xs, ys, s=14, alpha=0.8, c=cs, zorder=3)
        ax.set_xlim(0.4, len(boxes) + 0.6)
        ax.autoscale_view(scalex=False)
        ax.set_xticks(range(1, len(boxes) + 1), [label.replace("/", "\n", 1) for label, _ in boxes], fontsize=7)
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


def search_plot(searches: list[Search]) -> bytes:
    """One panel per category: every trial's validation curve in grey, the winner(s) in red."""
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(searches), width=5.0)
    for ax, search in zip(axes, searches, strict=True):
        selections = [g.selection for g in search.best if g.selection]
        winners = {str(sel.get("trial_run_id")) for sel in selections}
        metric = next(
            (str(sel.get("metric")) for sel in selections),
            next((k for t in search.trials for k in t.curve or {} if k.startswith("val_")), "val"),
        )
        lines: list[Any] = []
        for t in sorted(search.trials, key=lambda t: t.run_id):
            curve = t.curve or {}
            epochs, values = curve.get("epoch", []), curve.get(metric, [])
            points = [(e, v) for e, v in zip(epochs, values, strict=False) if e is not None and v is not None]
            if points and t.run_id in winners:
                ax.plot(*zip(*points, strict=True), "-o", ms=3, lw=2.5, color="tab:red", zorder=3)
            elif points:
                lines.append(points)
        ax.add_collection(LineCollection(lines, linewidths=0.8, colors="tab:gray", alpha=0.5))
        ax.autoscale_view()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        where = f" in {search.variant}" if search.variant else ""
        ax.set_title(f"{search.category}{where}: {len(search.trials)} trials", fontsize=9)
    fig.suptitle(f"{searches[0].sweep}/{searches[0].model}: trials' validation curves, winner red", fontsize=10)
    return _png(fig)


def score_diff_plot(crosses: list[CrossEnvironment]) -> bytes:
    """Per pair of environments: how far every test image's score moved, over every group and
    seed both ran, as a histogram of log10 |difference| (bitwise-equal scores counted apart).

    One panel per pair of environments, however many groups: a store of 300 groups in three
    environments draws three histograms, not millions of points."""
    by_pair: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    names: dict[tuple[str, str], str] = {}
    for c in crosses:
        key = (c.a.environment_id, c.b.environment_id)
        names[key] = f"{c.a.variant or c.a.environment_id} vs {c.b.variant or c.b.environment_id}"
        for p in c.pairs:
            aligned = aligned_scores(p.a, p.b)
            if aligned is not None:
                by_pair[key].append(np.abs(aligned[0] - aligned[1]))
    fig, axes = _figure(len(by_pair), width=4.5)
    edges = np.arange(-12, 1.01, 0.5)  # 1e-12 .. 10, half a decade a bin
    for ax, (key, diffs) in zip(axes, sorted(by_pair.items()), strict=True):
        values = np.concatenate(diffs)
        equal = int(np.sum(values == 0))
        moved = np.log10(values[values > 0])
        ax.hist(np.clip(moved, edges[0], edges[-1]), bins=edges.tolist(), color="tab:red", alpha=0.8)
        ax.set_xlabel("log10 |score difference| per image", fontsize=8)
        ax.set_ylabel("test images", fontsize=8)
        ax.set_title(f"{names[key]}: {len(values)} images, {equal} equal", fontsize=8)
    fig.suptitle("Same seed, other environment: how far each test image's score moved", fontsize=10)
    return _png(fig)
