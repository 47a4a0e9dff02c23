"""The stability report: markdown a reviewer reads on GitHub, with PNG plots beside it.

Built from the checker's answer only, so it needs the store and nothing else. The same store
gives the same bytes: rows are sorted, the only times shown are the records' own, and plots
are drawn without timestamps (matplotlib's PNG writer adds none).
"""

from __future__ import annotations

import io
import json
import shlex
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.check import (
    CONTENT_HASHES,
    CheckReport,
    Group,
    Run,
    Search,
    Stat,
    bootstrap_means,
    determinism_cell,
    failed_lines,
    flatten,
    fmt_value,
)
from harness.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes

GIB = 2**30
PLOTTED = ("image_AUROC", "pixel_AUROC")
MVTEC_TEST_IMAGES = {  # MVTec AD's test split per category: how a reference knows it applies
    "bottle": 83,
    "cable": 150,
    "capsule": 132,
    "carpet": 117,
    "grid": 78,
    "hazelnut": 110,
    "leather": 124,
    "metal_nut": 115,
    "pill": 167,
    "screw": 160,
    "tile": 117,
    "toothbrush": 42,
    "transistor": 100,
    "wood": 79,
    "zipper": 151,
}
_CATS: tuple[str, ...] = ("carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut")
_CATS += ("metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper")


@dataclass(frozen=True)
class Reference:
    """A published number: single runs, so a point to hold against our interval."""

    model: str
    metric: str
    values: dict[str, float]  # category (or "mean") -> value
    source: str
    backbone: str  # the backbone it was measured with ("" where the model has none to choose)


def _per_category(row: str, mean: float) -> dict[str, float]:
    """A published row in MVTec AD's usual column order (_CATS), plus its mean."""
    return dict(zip(_CATS, map(float, row.split()), strict=True)) | {"mean": mean}


_ANOMALIB_R18 = "anomalib PatchCore README (ResNet-18, seed 42, one run)"
_PAPER = "PatchCore paper, Roth et al. CVPR 2022 (WideResNet-50, 10% coreset)"
REFERENCES = (
    Reference(
        "patchcore",
        "image_AUROC",
        _per_category(
            "0.970 0.947 1.000 0.997 0.997 1.000 0.986 0.965 1.000 0.991 0.916 0.943 0.931 0.996 0.953", 0.973
        ),
        _ANOMALIB_R18,
        backbone="resnet18",
    ),
    Reference(
        "patchcore",
        "pixel_AUROC",
        _per_category(
            "0.986 0.955 0.990 0.943 0.933 0.981 0.984 0.986 0.986 0.986 0.974 0.991 0.988 0.974 0.983", 0.976
        ),
        _ANOMALIB_R18,
        backbone="resnet18",
    ),
    Reference(
        "ganomaly",
        "image_AUROC",
        _per_category(
            "0.203 0.404 0.413 0.408 0.744 0.251 0.457 0.682 0.537 0.270 0.472 0.231 0.372 0.440 0.434", 0.421
        ),
        "anomalib GANomaly README (seed 42, one run)",
        backbone="",
    ),
    Reference("patchcore", "image_AUROC", {"mean": 0.990}, _PAPER, backbone="wide_resnet50_2"),
    Reference("patchcore", "pixel_AUROC", {"mean": 0.981}, _PAPER, backbone="wide_resnet50_2"),
)


STABILITY_COLUMNS = (
    "model",
    "category",
    "seeds",
    "image AUROC",
    "image AUROC 95% CI",
    "image AUROC min-max",
    "image AUROC CV",
    "pixel AUROC",
    "pixel AUROC 95% CI",
    "pixel AUROC min-max",
    "pixel AUROC CV",
    "determinism",
    "fit s",
    "peak RSS GiB",
    "failed",
)


def report_command(results: Path, sweep: str = "*", out: Path | None = None) -> str:
    """The ``harness report`` line that rebuilds a report: printed in its header."""
    only = f" --sweep {sweep}" if sweep != "*" else ""
    return f"harness report {results}{only}" + (f" --out {out}" if out else "")


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)]


def _ci(stat: Stat | None) -> str:
    if stat is None or stat.ci_low is None:
        return "-"
    return f"[{stat.ci_low:.3f}, {stat.ci_high:.3f}]"


def _mean_std(stat: Stat | None) -> str:
    if stat is None:
        return "-"
    return f"{stat.mean:.3f}" + (" (1 seed)" if stat.std is None else f" ± {stat.std:.3f}")


def _range(stat: Stat | None) -> str:
    return "-" if stat is None else f"{stat.values.min():.3f}-{stat.values.max():.3f}"


def _cv(stat: Stat | None) -> str:
    return "-" if stat is None or stat.cv is None else f"{100 * stat.cv:.2f}%"


def _cells(stat: Stat | None) -> tuple[str, str, str, str]:
    return _mean_std(stat), _ci(stat), _range(stat), _cv(stat)


def _cost(g: Group) -> tuple[str, str]:
    fit, rss = g.stats.get("fit_s"), g.stats.get("peak_rss_bytes")
    return ("-" if fit is None else f"{fit.mean:.1f}", "-" if rss is None else f"{rss.mean / GIB:.2f}")


def mean_over_categories(groups: list[Group], metric: str) -> Stat | None:
    """Per seed, the mean over categories (the "Avg" of published tables), over shared seeds."""
    with_metric = [g for g in groups if metric in g.stats]
    if not with_metric:
        return None
    per_seed = [dict(zip(g.stats[metric].seeds, g.stats[metric].values, strict=True)) for g in with_metric]
    shared = sorted(set.intersection(*(set(p) for p in per_seed)))
    if not shared:
        return None
    return Stat(np.array([np.mean([p[s] for p in per_seed]) for s in shared]), np.array(shared))


@dataclass
class StabilityReport:
    """The report's content; ``render`` gives the markdown, ``plots`` the PNG bytes by name."""

    check: CheckReport
    command: str
    name: str

    def by_label(self) -> dict[str, list[Group]]:
        out: dict[str, list[Group]] = defaultdict(list)
        for g in self.check.groups:
            if g.ok:
                out[g.label].append(g)
        return dict(sorted(out.items()))

    # --- sections ---

    def header(self) -> list[str]:
        st = self.check.store
        runs = st.runs
        lines = [
            f"# Stability report: {self.name}",
            "",
            f"Built by `{self.command}` from {st.n_files} records"
            + (f" ({len(st.malformed)} malformed, skipped: see the end)" if st.malformed else "")
            + ". The same store always gives the same report, byte for byte.",
            "",
            "## What was run",
            "",
        ]
        by_sweep: dict[str, list[Run]] = defaultdict(list)
        for r in runs:
            by_sweep[r.sweep].append(r)
        rows = []
        for sweep, mine in sorted(by_sweep.items()):
            tested = [r for r in mine if r.role != "trial"]
            rows.append(
                (
                    f"`{sweep}`",
                    ", ".join(sorted({r.model for r in mine})),
                    ", ".join(sorted({r.category for r in mine})),
                    _ints(r.seed for r in tested),
                    str(max((r.repeat for r in tested), default=-1) + 1),
                    f"{sum(r.status == 'ok' for r in tested)} / {sum(r.status == 'failed' for r in tested)}",
                    str(len(mine) - len(tested)),
                    min(r.started_at for r in mine),
                    max(r.finished_at for r in mine),
                )
            )
        header = ("sweep", "models", "categories", "seeds", "repeats", "runs ok / failed", "search trials")
        lines += md_table((*header, "first start", "last finish"), rows)
        lines += ["", "Hardware (each `hardware_id` hashes device, GPU model, CPU model and threads):", ""]
        lines += md_table(
            ("hardware_id", "device", "GPU", "CPU", "threads", "torch", "CUDA", "anomalib", "hosts", "runs"),
            self._hardware_rows(),
        )
        lines += ["", "To reproduce the test runs (one shell loop per sweep, model and configuration):", ""]
        lines += ["```bash", *self._commands(), "```"]
        return lines

    def _hardware_rows(self) -> list[Sequence[str]]:
        st = self.check.store
        runs_by_hw: dict[str, list[Run]] = defaultdict(list)
        for r in st.runs:
            runs_by_hw[r.hardware_id].append(r)
        rows: list[Sequence[str]] = []
        for hw, runs in sorted(runs_by_hw.items()):
            envs = [st.envs[e] for e in sorted({r.env_id for r in runs})]

            def vals(key: str, envs: list[dict[str, Any]] = envs) -> str:
                return ", ".join(sorted({"-" if e.get(key) is None else str(e.get(key)) for e in envs}))

            rows.append(
                (
                    f"`{hw}`",
                    vals("device"),
                    vals("gpu_name"),
                    vals("cpu_model"),
                    vals("threads"),
                    vals("torch"),
                    vals("cuda"),
                    vals("anomalib"),
                    vals("host"),
                    str(len(runs)),
                )
            )
        return rows

    def _commands(self) -> list[str]:
        """`harness run` loops over exactly the stored runs, with every recorded setting.

        Every setting is spelt out, so defaults changing in a later harness cannot bite.
        """
        st = self.check.store
        commands: dict[tuple[str, str, str, str, str, str], str] = {}
        points: dict[str, dict[str, set[tuple[int, int]]]] = defaultdict(lambda: defaultdict(set))
        for r in st.runs:
            if r.role == "trial":
                continue
            key = (r.sweep, r.model, r.config_id, r.env_id, r.data_root, r.role)
            if key not in commands:
                commands[key] = _run_command(r, st.params[r.config_id], st.envs[r.env_id])
            points[commands[key]][r.category].add((r.seed, r.repeat))
        out = []
        for command, by_category in sorted(points.items()):
            same_points: dict[frozenset[tuple[int, int]], list[str]] = defaultdict(list)
            for category, runs in by_category.items():
                same_points[frozenset(runs)].append(category)
            for pairs, categories in sorted(same_points.items(), key=lambda kv: sorted(kv[1])):
                seeds, repeats = sorted({s for s, _ in pairs}), sorted({r for _, r in pairs})
                cats = " ".join(sorted(categories))
                if len(pairs) == len(seeds) * len(repeats):
                    head = f"for s in {' '.join(map(str, seeds))}; do for r in {' '.join(map(str, repeats))}; do"
                else:  # not a full grid: name each seed and repeat
                    sr = " ".join(f"{s}:{r}" for s, r in sorted(pairs))
                    head = f"for sr in {sr}; do s=${{sr%:*}} r=${{sr#*:}}"
                out += [f"for c in {cats}; do {head}", f"  {command}", "done; " * head.count("do") + "done"]
        commits = sorted({str(e.get("harness_commit")) for e in st.envs.values()})
        return [f"# at harness commit {', '.join(commits)}", *out]

    def stability_rows(self) -> list[tuple[bool, tuple[str, ...]]]:
        """The stability table's rows (``STABILITY_COLUMNS``), each flagged if it is a mean row."""
        rows: list[tuple[bool, tuple[str, ...]]] = []
        for label, groups in self.by_label().items():
            for g in groups:
                im, px = g.stats.get("image_AUROC"), g.stats.get("pixel_AUROC")
                cells = (*_cells(im), *_cells(px), determinism_cell(g), *_cost(g), str(len(g.failed)))
                rows.append((False, (label, g.category, str(len(g.seeds)), *cells)))
            if len(groups) > 1:
                im, px = means = [mean_over_categories(groups, m) for m in PLOTTED]
                bootstrap_means(s for s in means if s is not None)
                n_failed = str(sum(len(g.failed) for g in groups))
                head = (label, f"mean of {len(groups)}", "-" if im is None else str(im.n))
                rows.append((True, (*head, *_cells(im), *_cells(px), "", "", "", n_failed)))
        return rows

    def stability(self) -> list[str]:
        lines = [
            "## Stability over seeds",
            "",
            "One value per seed (repeats of a seed are averaged: they test determinism, not spread). "
            "95% CI: BCa bootstrap of the mean, seeded. CV: std / mean. Failed runs are counted, never averaged in.",
            "",
        ]
        header = [c.split(" AUROC ")[-1] for c in STABILITY_COLUMNS]  # "image AUROC CV" -> "CV"
        rows = [tuple(f"**{c}**" for c in row[:2]) + row[2:] if mean else row for mean, row in self.stability_rows()]
        lines += md_table(header, rows)
        failed = failed_lines(self.check.groups)
        if failed:
            lines += ["", "Failed runs:", "", *(f"- {line}" for line in failed)]
        singles = [g for g in self.check.groups if g.note]
        if singles:
            lines += ["", *(f"- {g.label} {g.category}: {g.note}" for g in singles)]
        return lines

    def references(self) -> list[str]:
        rows = []
        for label, groups in self.by_label().items():
            for ref in REFERENCES:
                cells = self._reference_cells(groups, ref)
                rows += [(label, *c, ref.source) for c in cells]
        if not rows:
            return []
        return [
            "## Published numbers beside ours",
            "",
            "Single runs (one seed), so a point against our interval. Shown only where the model, backbone "
            "and category match and the test split has MVTec AD's size.",
            "",
            *md_table(
                ("model", "category", "metric", "ours: mean [95% CI]", "published", "inside our CI?", "source"), rows
            ),
        ]

    def _reference_cells(self, groups: list[Group], ref: Reference) -> list[tuple[str, ...]]:
        """Rows of one published table for one model's groups: per category, then the mean.

        A number measured with another backbone is shown (the paper's is the one people quote)
        but not held against our interval.
        """
        st = self.check.store
        mine = [
            g
            for g in groups
            if g.model == ref.model and ref.metric in g.stats and MVTEC_TEST_IMAGES.get(g.category) == g.ok[0].n_test
        ]
        backbones = {st.params[g.config_id].get("model_args", {}).get("backbone") for g in mine}
        other = f"n/a: {ref.backbone} vs our {', '.join(sorted(map(str, backbones)))}"
        unlike = "" if not ref.backbone or backbones == {ref.backbone} else other
        out = [
            _ref_row(g.category, ref, g.stats[ref.metric], ref.values[g.category], unlike)
            for g in mine
            if g.category in ref.values
        ]
        if len(mine) == len(MVTEC_TEST_IMAGES) and "mean" in ref.values:
            mean = mean_over_categories(mine, ref.metric)
            if mean is not None:
                bootstrap_means([mean])
                out.append(_ref_row("mean", ref, mean, ref.values["mean"], unlike))
        return out

    def determinism(self) -> list[str]:
        pairs = [(g, p) for g in self.check.groups for p in g.determinism.pairs]
        lines = ["## Determinism", ""]
        if not pairs:
            return [*lines, "No seed was repeated on the same hardware: determinism is untested."]
        bitwise = sum(p.verdict == "bitwise" for _, p in pairs)
        lines.append(
            f"{len(pairs)} pairs of same-seed repeats on the same hardware: {bitwise} bitwise identical "
            f"(scores and maps); tolerance {self.check.tolerance:g} on each metric."
        )
        differing = [f"- {g.label} {g.category}: {ln}" for g in self.check.groups if (ln := g.determinism.summary())]
        return lines + (["", *differing] if differing else [])

    def cross_hardware(self) -> list[str]:
        rows = []
        for g in self.check.groups:
            for c in g.cross_hardware:
                doc = c.to_json()
                deltas = doc["deltas"]

                def delta(m: str, deltas: dict[str, Any] = deltas) -> str:
                    d = deltas.get(m)
                    return "-" if d is None else f"{d['mean']:+.4f} (max {d['max_abs']:.4f})"

                ratio = doc["delta_over_seed_std"]
                differs = ", ".join(f"{k}: {a} → {b}" for k, (a, b) in doc["fingerprint_diff"].items())
                rows.append(
                    (
                        g.label,
                        g.category,
                        f"`{c.hardware_a}` → `{c.hardware_b}`",
                        str(len(c.pairs)),
                        delta("image_AUROC"),
                        delta("pixel_AUROC"),
                        "-" if ratio is None else f"{ratio:.2f}",
                        c.verdict,
                        differs or "-",
                    )
                )
        if not rows:
            return []
        header = ("model", "category", "hardware", "seeds", "Δ image AUROC", "Δ pixel AUROC", "|Δ| / seed std")
        return [
            "## Across hardware",
            "",
            "Same configuration and seed on different hardware (lowest repeat on each side); Δ = second - first.",
            "",
            *md_table((*header, "verdict", "what differs"), rows),
        ]

    def comparisons(self) -> list[str]:
        if not self.check.comparisons:
            return []
        rows = [
            (
                c.category,
                c.metric,
                c.a.label,
                c.b.label,
                f"{c.a.stats[c.metric].n} / {c.b.stats[c.metric].n}",
                f"{c.p:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}]",
                c.verdict,
            )
            for c in self.check.comparisons
        ]
        return [
            "## Model comparison",
            "",
            "P(A>B): the chance that a seed of A scores above a seed of B (ties count half), with a seeded "
            "percentile bootstrap 95% CI. `A better` when the CI is above 0.5 and P(A>B) ≥ 0.75 "
            "(Bouthillier et al., MLSys 2021); `B better` the other way round; otherwise `within noise`; "
            "under 3 seeds a side, `too few seeds`. Only configurations tested on the same data are compared.",
            "",
            *md_table(("category", "metric", "A", "B", "seeds A / B", "P(A>B) [95% CI]", "verdict"), rows),
        ]

    def searches(self) -> list[str]:
        if not self.check.searches:
            return []
        rows = []
        for s in self.check.searches:
            doc = s.to_json()
            trials = f"{doc['n_trials']} ({doc['n_ok']} ok, {doc['n_failed']} failed, "
            trials += f"{doc['n_stopped_early']} stopped early)"
            for g in s.best:
                sel = g.selection or {}
                im = g.stats.get("image_AUROC")
                config = ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted((sel.get("config") or {}).items()))
                validation = f"{sel.get('metric', '-')} {fmt_value(sel.get('value'))}"
                rows.append((f"{s.sweep}/{s.model}", s.category, trials, f"`{config}`", validation, *_cells(im)[:3]))
            if not s.best:
                rows.append((f"{s.sweep}/{s.model}", s.category, trials, "-", "-", "-", "-", "-"))
        header = ("search", "category", "trials", "best config", "validation", "test image AUROC", "95% CI", "min-max")
        return [
            "## Hyperparameter searches",
            "",
            *md_table(header, rows),
            "",
            "Selection rule: " + _rules(self.check.searches),
        ]

    def render(self, plots: Sequence[str]) -> str:
        lines = self.header()
        for section in (self.stability, self.references, self.determinism, self.cross_hardware, self.comparisons):
            part = section()
            if part:
                lines += ["", *part]
        part = self.searches()
        if part:
            lines += ["", *part]
        if plots:
            lines += ["", "## Plots", ""]
            lines += "\n\n".join(f"![{Path(p).stem}]({p})" for p in plots).splitlines()
        if self.check.store.malformed:
            lines += ["", "## Malformed records (skipped)", ""]
            lines += [f"- `{p}`: {e}" for p, e in self.check.store.malformed]
        return "\n".join(lines) + "\n"

    # --- plots ---

    def plots(self) -> dict[str, bytes]:
        by_label = self.by_label()
        out = {}
        for metric in PLOTTED:
            if any(metric in g.stats for gs in by_label.values() for g in gs):
                out[f"seeds-{metric}"] = _seed_plot(by_label, metric)
        by_sweep: dict[tuple[str, str], list[Search]] = defaultdict(list)
        for s in self.check.searches:
            if any(t.curve for t in s.trials):
                by_sweep[(s.sweep, s.model)].append(s)
        for (sweep, model), searches in sorted(by_sweep.items()):
            out[f"search-{sweep}-{model}"] = _search_plot(searches)
        return out


def _ints(values: Iterable[int]) -> str:
    v = sorted(set(values))
    if not v:
        return "-"
    return f"{v[0]}-{v[-1]}" if len(v) > 2 and v == list(range(v[0], v[-1] + 1)) else ", ".join(map(str, v))


def _run_command(run: Run, params: dict[str, Any], env: dict[str, Any]) -> str:
    """The `harness run` line of one configuration (category, seed and repeat left to the loop)."""
    device = "cuda" if str(env.get("device", "cpu")).startswith("cuda") else "cpu"
    settings = {
        k: v
        for k, v in flatten(params).items()
        if k not in {f"{group}.{key}" for group, key in CONTENT_HASHES.items()}  # hashes, not settings
    }
    sets = [f"name={run.sweep}", f"resources.cpu={env.get('threads')}"]
    sets += [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(settings.items())]
    head = f"harness run --model {run.model} --data-root {shlex.quote(run.data_root)}"
    head += f" --category $c --seed $s --repeat $r --device {device}"
    note = ""
    if run.role == "best":
        note = f"# the configuration {run.sweep}'s search selected (a rerun by hand is stored with role run)\n  "
    if settings.get("model_args.weights"):
        note += "# model_args.weights is the recorded file name: give its path on your machine\n  "
    return note + head + "".join(f" \\\n      --set {shlex.quote(s)}" for s in sets)


def _rules(searches: list[Search]) -> str:
    rules = sorted({str(g.selection.get("rule")) for s in searches for g in s.best if g.selection})
    text = "; ".join(rules) or "-"
    return text + ". The winner is retrained on all training images and tested once per seed and repeat."


def _ref_row(category: str, ref: Reference, stat: Stat, value: float, unlike: str) -> tuple[str, ...]:
    if unlike:
        inside = unlike
    elif stat.ci_low is None or stat.ci_high is None:
        inside = "no interval (1 seed)" if stat.n == 1 else "no interval"
    else:
        inside = (
            "yes" if stat.ci_low <= value <= stat.ci_high else ("no, above" if value > stat.ci_high else "no, below")
        )
    return (category, ref.metric, f"{stat.mean:.3f} {_ci(stat)}", f"{value:.3f}", inside)


def _figure(n_panels: int, width: float = 4.0) -> tuple[Any, list[Axes]]:
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = -(-n_panels // cols)
    w, h = width * cols, 3.2 * rows + 0.4
    fig = Figure(figsize=(w, h), dpi=100)
    # Fixed margins in inches (tight_layout would draw every figure twice).
    fig.subplots_adjust(left=0.7 / w, right=1 - 0.15 / w, top=1 - 0.5 / h, bottom=0.6 / h, hspace=0.75, wspace=0.3)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _seed_plot(by_label: dict[str, list[Group]], metric: str) -> bytes:
    """Per category, a box per model (quartiles, whiskers at 1.5 IQR) with every seed drawn over it.

    Boxes are drawn as a few collections per panel rather than ``boxplot``'s artists per box,
    which took seconds a figure for a store of 300 groups.
    """
    from matplotlib.collections import LineCollection, PolyCollection

    cells: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
    for label, groups in by_label.items():
        for g in groups:
            if metric in g.stats:
                cells[g.category].append((label, g.stats[metric].values))
    fig, axes = _figure(len(cells))
    for ax, (category, boxes) in zip(axes, sorted(cells.items()), strict=True):
        boxes_xy: list[Any] = []
        segments: list[Any] = []
        xs: list[float] = []
        ys: list[float] = []
        for i, (_, v) in enumerate(boxes, start=1):
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            lo = v[v >= q1 - 1.5 * (q3 - q1)].min()
            hi = v[v <= q3 + 1.5 * (q3 - q1)].max()
            boxes_xy.append([(i - 0.25, q1), (i + 0.25, q1), (i + 0.25, q3), (i - 0.25, q3)])
            segments += [[(i - 0.25, med), (i + 0.25, med)], [(i, lo), (i, q1)], [(i, q3), (i, hi)]]
            xs += list(i + (np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(1)))
            ys += list(v)
        ax.add_collection(PolyCollection(boxes_xy, facecolors="none", edgecolors="black", linewidths=0.8))
        ax.add_collection(LineCollection(segments, colors="black", linewidths=0.8))
        ax.scatter(xs, ys, s=14, alpha=0.7, color="tab:blue", zorder=3)
        ax.set_xlim(0.4, len(boxes) + 0.6)
        ax.autoscale_view(scalex=False)
        ax.set_xticks(range(1, len(boxes) + 1), [label.replace("/", "\n", 1) for label, _ in boxes], fontsize=7)
        ax.set_title(category, fontsize=9)
        ax.set_ylabel(metric.replace("_", " "), fontsize=8)
    fig.suptitle(f"{metric.replace('_', ' ')} over seeds (points) per model and category", fontsize=10)
    return _png(fig)


def _search_plot(searches: list[Search]) -> bytes:
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
        ax.set_title(f"{search.category}: {len(search.trials)} trials", fontsize=9)
    fig.suptitle(f"{searches[0].sweep}/{searches[0].model}: trials' validation curves, winner red", fontsize=10)
    return _png(fig)


def default_out(check: CheckReport) -> Path:
    sweeps = sorted({r.sweep for r in check.store.runs})
    return Path("reports") / f"{sweeps[0] if len(sweeps) == 1 else check.store.root.resolve().name}.md"


def write_report(check: CheckReport, out: Path, command: str) -> tuple[Path, list[Path]]:
    """Write ``out`` and its plots (in the folder ``<stem>/`` beside it), each atomically.

    Plots of an earlier report of the same name that this one no longer has are removed.
    """
    report = StabilityReport(check, command, out.stem)
    plot_dir = out.parent / out.stem
    names = {f"{key}.png": data for key, data in sorted(report.plots().items())}
    for name, data in names.items():
        atomic_write_bytes(plot_dir / name, data)
    for old in plot_dir.glob("*.png"):
        if old.name not in names and old.name.startswith(("seeds-", "search-")):
            old.unlink()
    atomic_write_bytes(out, report.render([f"{out.stem}/{n}" for n in sorted(names)]).encode())
    return out, [plot_dir / n for n in sorted(names)]
