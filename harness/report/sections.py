"""The stability report's markdown, section by section, from the checker's answer alone."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.check import CheckReport, Group, Run, Search, Stat
from harness.check.pairs import env_label
from harness.check.power import POWER
from harness.check.stats import (
    CI,
    CONFIDENCE,
    MEANINGFUL,
    MIN_SEEDS_TO_COMPARE,
    N_RESAMPLES,
    bootstrap_means,
    mean_over_categories,
)
from harness.check.summary import (
    adaptive_table,
    aggregate_tables,
    determinism_cell,
    failed_lines,
    held_tables,
    mdd_cell,
    p_cell,
    scores_cell,
    seeds_needed_cell,
    sources_table,
    trial_counts,
)
from harness.formatting import GIB, flatten, fmt_ints, fmt_value, md_table, stat_cells
from harness.report.plots import PLOTTED, Plot, profile_figure, score_diff_figure, search_figure, seeds_figure
from harness.report.references import MVTEC_TEST_IMAGES, REFERENCES, Reference
from harness.report.reproduce import reproduce_commands

STABILITY_COLUMNS = (
    "model",
    "category",
    "seeds",
    "image AUROC",
    f"image AUROC {CI}",
    "image AUROC min-max",
    "image AUROC CV",
    "pixel AUROC",
    f"pixel AUROC {CI}",
    "pixel AUROC min-max",
    "pixel AUROC CV",
    "determinism",
    "fit s",
    "peak RSS GiB",
    "failed",
)


def _cost(g: Group) -> tuple[str, str]:
    fit, rss = g.stats.get("fit_s"), g.stats.get("peak_rss_bytes")
    return ("-" if fit is None else f"{fit.mean:.1f}", "-" if rss is None else f"{rss.mean / GIB:.2f}")


def _mean_of(groups: list[Group], metric: str) -> Stat | None:
    return mean_over_categories([g.stats[metric] for g in groups if metric in g.stats])


@dataclass
class StabilityReport:
    """The report's content; ``render`` gives the markdown, ``plots`` the figures' data by name."""

    check: CheckReport
    command: str
    name: str

    def by_label(self) -> dict[str, list[Group]]:
        out: dict[str, list[Group]] = defaultdict(list)
        for g in self.check.views:
            if g.ok:
                out[g.label].append(g)
        return dict(sorted(out.items()))

    def header(self) -> list[str]:
        st = self.check.store
        lines = [
            f"# Stability report: {self.name}",
            "",
            f"Built by `{self.command}` from {st.n_files} records"
            + (f" ({len(st.malformed)} malformed, skipped: see the end)" if st.malformed else "")
            + (f" ({len(st.corrupt)} corrupt, left out: see the end)" if st.corrupt else "")
            + ". The same store always gives the same report, byte for byte.",
            "",
            "## What was run",
            "",
        ]
        by_sweep: dict[str, list[Run]] = defaultdict(list)
        for r in st.runs:
            by_sweep[r.sweep].append(r)
        rows = []
        for sweep, mine in sorted(by_sweep.items()):
            tested = [r for r in mine if r.role != "trial"]
            rows.append(
                (
                    f"`{sweep}`",
                    ", ".join(sorted({r.model for r in mine})),
                    ", ".join(sorted({r.category for r in mine})),
                    fmt_ints(r.seed for r in tested),
                    str(max((r.repeat for r in tested), default=-1) + 1),
                    f"{sum(r.status == 'ok' for r in tested)} / {sum(r.status == 'failed' for r in tested)}",
                    str(len(mine) - len(tested)),
                    min(r.started_at for r in mine),
                    max(r.finished_at for r in mine),
                )
            )
        header = ("sweep", "models", "categories", "seeds", "repeats", "runs ok / failed", "search trials")
        lines += md_table((*header, "first start", "last finish"), rows)
        lines += ["", *self.environments()]
        lines += ["", "To reproduce the test runs (one shell loop per sweep, model and configuration):", ""]
        lines += ["```bash", *reproduce_commands(st), "```"]
        return lines

    def environments(self) -> list[str]:
        """Where the runs were made: each execution environment, and the machine under it."""
        st = self.check.store
        runs_by_env: dict[str, list[Run]] = defaultdict(list)
        for r in st.runs:
            runs_by_env[r.environment_id].append(r)
        rows: list[Sequence[str]] = []
        for env, runs in sorted(runs_by_env.items(), key=lambda kv: (kv[1][0].variant or "", kv[0])):
            envs = [flatten(st.envs[e]) for e in sorted({r.env_id for r in runs})]

            def vals(key: str, envs: list[dict[str, Any]] = envs) -> str:
                return ", ".join(sorted({"-" if e.get(key) is None else str(e.get(key)) for e in envs}))

            cpuid = ("cpu.family", "cpu.model_number", "cpu.stepping")
            cpu = f"{vals('cpu_model')} ({'/'.join(map(vals, cpuid))})"
            isa = f"{vals('torch_build.cpu_capability')} / {vals('torch_build.onednn_isa')}"
            shown = ("threads", "onednn", "matmul_precision", "autocast", "deterministic")
            settings = " ".join(f"{k}={vals(f'execution.{k}')}" for k in shown)
            software = (vals("torch"), vals("cuda"), vals("gpu_name"), vals("host"), str(len(runs)))
            rows.append(
                (f"`{env}`", vals("variant"), f"`{vals('machine_id')}`", vals("device"), cpu, isa, settings, *software)
            )
        header = ("environment_id", "variant", "machine_id", "device", "CPU", "ISA torch / oneDNN", "settings")
        return [
            "Made in these environments (CPU: model (family/model/stepping); the machine_id hashes the CPU's "
            "identity and flags, the kernel and the GPU; the environment_id adds software, dispatch and settings):",
            "",
            *md_table((*header, "torch", "CUDA", "GPU", "hosts", "runs"), rows),
        ]

    def stability_rows(self) -> list[tuple[bool, tuple[str, ...]]]:
        """The stability table's rows (``STABILITY_COLUMNS``), each flagged if it is a mean row."""
        rows: list[tuple[bool, tuple[str, ...]]] = []
        for label, groups in self.by_label().items():
            for g in groups:
                im, px = g.stats.get("image_AUROC"), g.stats.get("pixel_AUROC")
                cells = (*stat_cells(im), *stat_cells(px), determinism_cell(g), *_cost(g), str(len(g.failed)))
                rows.append((False, (label, g.category, str(len(g.seeds)), *cells)))
            if len(groups) > 1:
                im, px = means = [_mean_of(groups, m) for m in PLOTTED]
                bootstrap_means(s for s in means if s is not None)
                n_failed = str(sum(len(g.failed) for g in groups))
                head = (label, f"mean of {len(groups)}", "-" if im is None else str(im.n))
                rows.append((True, (*head, *stat_cells(im), *stat_cells(px), "", "", "", n_failed)))
        return rows

    def stability(self) -> list[str]:
        lines = [
            "## Stability over seeds",
            "",
            "One value per seed (repeats of a seed are averaged: they test determinism, not spread). "
            f"{CI}: BCa bootstrap of the mean, seeded. CV: std / mean. "
            "Failed runs are counted, never averaged in.",
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

    def adaptive(self) -> list[str]:
        """Adaptive seed studies: which groups reached the CI target, which stopped at the maximum."""
        table = adaptive_table(self.check)
        if table is None:
            return []
        return [
            "## Adaptive seed studies",
            "",
            f"Seeds were added in rounds while a group's {CI} of the metric's mean (the stability table's "
            "interval) was wider than the target half-width, up to the study's maximum. `in progress`: the "
            "study stopped before either (a rerun of the sweep goes on).",
            "",
            *md_table(*table),
        ]

    def power(self) -> list[str]:
        """Per model and category, the difference its seeds could detect (MDD) in each plotted metric."""
        rows = []
        for label, groups in self.by_label().items():
            for g in groups:
                cells = [(stat_cells(st)[0], mdd_cell(st)) for st in (g.stats.get(m) for m in PLOTTED)]
                rows.append((label, g.category, str(len(g.seeds)), *(c for pair in cells for c in pair)))
        if not rows:
            return []
        header = ("model", "category", "seeds", "image AUROC", "image MDD", "pixel AUROC", "pixel MDD")
        return [
            "## What the seeds could detect",
            "",
            f"MDD: the smallest difference in the metric that a comparison of two groups like this one (its seed "
            f"std, its seeds on each side) detects with {POWER:.0%} power: a two-sided two-sample t-test at "
            f"{1 - CONFIDENCE:.0%}, solved exactly with the noncentral t. A real difference below it is missed "
            "more often than not; the model comparison says how many seeds a side a given difference needs. "
            "`-`: one seed, or every seed the same.",
            "",
            *md_table(header, rows),
        ]

    def references(self) -> list[str]:
        rows = []
        for label, groups in self.by_label().items():
            for ref in REFERENCES:
                rows += [(label, *c, ref.source) for c in self._reference_cells(groups, ref)]
        if not rows:
            return []
        return [
            "## Published numbers beside ours",
            "",
            "Single runs (one seed), so a point against our interval. Shown only where the model, backbone "
            "and category match and the test split has MVTec AD's size.",
            "",
            *md_table(
                ("model", "category", "metric", f"ours: mean [{CI}]", "published", "inside our CI?", "source"), rows
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
            mean = _mean_of(mine, ref.metric)
            if mean is not None:
                bootstrap_means([mean])
                out.append(_ref_row("mean", ref, mean, ref.values["mean"], unlike))
        return out

    def determinism(self) -> list[str]:
        pairs = [(g, p) for g in self.check.groups for p in g.determinism.pairs]
        lines = ["## Determinism", ""]
        if not pairs:
            return [*lines, "No seed was repeated in the same environment: determinism is untested (set `repeats: 2`)."]
        bitwise = sum(p.verdict == "bitwise" for _, p in pairs)
        lines.append(
            f"{len(pairs)} pairs of same-seed repeats in the same environment: {bitwise} bitwise identical "
            f"(scores and maps); tolerance {self.check.tolerance:g} on each metric."
        )
        differing = [f"- {g.label} {g.category}: {ln}" for g in self.check.groups if (ln := g.determinism.summary())]
        return lines + (["", *differing] if differing else [])

    def cross_environment(self) -> list[str]:
        rows = []
        for g in self.check.groups:
            for c in g.cross_environment:
                deltas = c.deltas()

                def delta(m: str, deltas: dict[str, Any] = deltas) -> str:
                    d = deltas.get(m)
                    return "-" if d is None else f"{d['mean']:+.4f} (max {d['max_abs']:.4f})"

                ratio = c.delta_over_seed_std()
                differs = ", ".join(f"{k}: {a} → {b}" for k, (a, b) in c.fingerprint_diff().items())
                rows.append(
                    (
                        g.label,
                        g.category,
                        f"{env_label(c.a)} → {env_label(c.b)}",
                        str(len(c.pairs)),
                        c.verdict,
                        scores_cell(c),
                        delta("image_AUROC"),
                        delta("pixel_AUROC"),
                        "-" if ratio is None else f"{ratio:.2f}",
                        differs or "-",
                    )
                )
        if not rows:
            return []
        header = ("model", "category", "environments", "seeds", "verdict", "scores", "Δ image AUROC", "Δ pixel AUROC")
        lines = [
            "## Across environments",
            "",
            "Same configuration and seed in different execution environments (lowest repeat on each side); "
            "Δ = second - first; |Δ| / seed std sizes the image AUROC change against the spread over seeds.",
            "",
            *md_table((*header, "|Δ| / seed std", "what differs"), rows),
        ]
        comparisons, searches = held_tables(self.check)
        if comparisons:
            lines += ["", "Do the model comparisons hold in each environment (P(A>B) and verdict in each)?", ""]
            lines += md_table(*comparisons)
        if searches:
            lines += ["", "Does each search pick the same configuration in each environment?", ""]
            lines += md_table(*searches)
        return lines

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
                p_cell(c.p, c.ci_low, c.ci_high),
                c.verdict,
                seeds_needed_cell(c),
            )
            for c in self.check.comparisons
        ]
        detect = f"{self.check.detect:g}"
        header = ("category", "metric", "A", "B", "seeds A / B", f"P(A>B) [{CI}]", "verdict")
        return [
            "## Model comparison",
            "",
            "P(A>B): the chance that a seed of A scores above a seed of B (ties count half), with a seeded "
            f"percentile bootstrap {CI}. `A better` when the CI is above 0.5 and P(A>B) ≥ "
            f"{MEANINGFUL:g} (Bouthillier et al., MLSys 2021); `B better` the other way round; otherwise "
            f"`within noise`; under {MIN_SEEDS_TO_COMPARE} seeds a side, `too few seeds`. Only configurations "
            f"tested on the same data are compared. Seeds a side for {detect}: how many seeds each side needs for "
            f"a difference of {detect} in the metric to be detected with {POWER:.0%} power (the t-test above, "
            f"from the two sides' pooled std; `harness report --detect X` for another difference).",
            "",
            *md_table((*header, f"seeds a side for {detect}"), rows),
        ]

    def across(self) -> list[str]:
        """Per model over categories and seeds: mean and IQM with stratified intervals, and P(A>B)."""
        models, pairs = aggregate_tables(self.check)
        if models is None:
            return []
        lines = [
            "## Across categories",
            "",
            "Per model over every category and seed it ran (two categories or more), as Agarwal et al. (NeurIPS "
            "2021, rliable) recommend for few runs on many tasks: the mean (of the category means, as the mean "
            "row above) and the IQM, the interquartile mean of all category x seed scores (the middle 50%: one "
            f"category that fails or saturates moves it little), each with a stratified bootstrap {CI} "
            f"(seeds redrawn within each category, {N_RESAMPLES} resamples, seeded). The performance profile "
            "plot shows each model's share of category x seed runs scoring above every threshold.",
            "",
            *md_table(*models),
        ]
        if pairs:
            lines += [
                "",
                "P(A>B) averaged over the categories both models ran on the same data (in each, the chance that a "
                f"seed of A scores above a seed of B, ties half), with a stratified bootstrap {CI}; verdicts as "
                "in the model comparison, from the fewest seeds a side in any of those categories.",
                "",
                *md_table(*pairs),
            ]
        return lines

    def sources(self) -> list[str]:
        """Variance by source: how much of the seed spread each random stream makes alone."""
        table = sources_table(self.check)
        if table is None:
            return []
        return [
            "## Variance by source",
            "",
            "Where the seed spread comes from (Bouthillier et al., MLSys 2021). The reference runs let every "
            "random stream follow the seed; a source study lets only one follow it (`[init only]`: the "
            "initial weights; `[order only]`: the order of training images; `[sampling only]`: PatchCore's "
            "coreset), the others pinned. Share: that stream's variance over seeds against the reference's, "
            f"with the F interval of a ratio of two variances ({CI}; exact for a metric normal over seeds). "
            "Shares need not add up to 1: streams interact, and few seeds estimate a variance loosely.",
            "",
            *md_table(*table),
        ]

    def searches(self) -> list[str]:
        if not self.check.searches:
            return []
        rows = []
        for s in self.check.searches:
            trials = f"{s.counts['n_trials']} {trial_counts(s.counts)}"
            category = f"{s.category} in {s.variant}" if s.variant else s.category
            for g in s.best:
                sel = g.selection or {}
                im = g.stats.get("image_AUROC")
                config = ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted((sel.get("config") or {}).items()))
                validation = f"{sel.get('metric', '-')} {fmt_value(sel.get('value'))}"
                rows.append((f"{s.sweep}/{s.model}", category, trials, f"`{config}`", validation, *stat_cells(im)[:3]))
            if not s.best:
                rows.append((f"{s.sweep}/{s.model}", category, trials, "-", "-", "-", "-", "-"))
        header = ("search", "category", "trials", "best config", "validation", "test image AUROC", CI, "min-max")
        return [
            "## Hyperparameter searches",
            "",
            *md_table(header, rows),
            "",
            "Selection rule: " + _rules(self.check.searches),
        ]

    def render(self, plots: Sequence[str]) -> str:
        lines = self.header()
        sections = (self.stability, self.adaptive, self.power, self.references, self.determinism)
        for section in (*sections, self.cross_environment, self.sources, self.comparisons, self.across, self.searches):
            part = section()
            if part:
                lines += ["", *part]
        if plots:
            lines += ["", "## Plots", ""]
            lines += "\n\n".join(f"![{Path(p).stem}]({p})" for p in plots).splitlines()
        if self.check.store.malformed:
            lines += ["", "## Malformed records (skipped)", ""]
            lines += [f"- `{p}`: {e}" for p, e in self.check.store.malformed]
        if self.check.store.corrupt:
            lines += ["", "## Corrupt records (left out: their hash or metrics are not their scores')", ""]
            lines += [f"- `{p}`: {e}" for p, e in self.check.store.corrupt]
        return "\n".join(lines) + "\n"

    def plots(self) -> dict[str, Plot]:
        """Each figure's data by name: all its drawing needs (``harness.report.plots.draw``)."""
        by_label = self.by_label()
        out: dict[str, Plot] = {}
        for metric in PLOTTED:
            if any(metric in g.stats for gs in by_label.values() for g in gs):
                out[f"seeds-{metric}"] = seeds_figure(by_label, metric)
        by_sweep: dict[tuple[str, str], list[Search]] = defaultdict(list)
        for s in self.check.searches:
            if any(t.curve for t in s.trials):
                by_sweep[(s.sweep, s.model)].append(s)
        for (sweep, model), searches in sorted(by_sweep.items()):
            out[f"search-{sweep}-{model}"] = search_figure(searches)
        diffs = score_diff_figure([c for g in self.check.groups for c in g.cross_environment])
        if diffs.panels:
            out["environments-score-diff"] = diffs
        if self.check.aggregates:
            out["profile-categories"] = profile_figure(self.check.aggregates)
        return out


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
    return (category, ref.metric, f"{stat.mean:.3f} {stat_cells(stat)[1]}", f"{value:.3f}", inside)
