"""The checker's answer in words: the table ``harness check`` prints, and the cells and lines
the report shares with it."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

from harness.check.across import Aggregate
from harness.check.groups import CheckReport, Comparison, Group
from harness.check.pairs import CrossEnvironment, env_label
from harness.check.stats import CI, Stat
from harness.formatting import (
    config_label,
    fmt_small,
    fmt_stat,
    fmt_value,
    run_name,
    stat_cells,
    text_table,
)

Table = tuple[tuple[str, ...], list[tuple[str, ...]]]


def determinism_cell(group: Group) -> str:
    """``bitwise (3/3 pairs bitwise)``; without repeats, how to test it."""
    d = group.determinism
    tested = {(r.seed, r.environment_id) for r in group.ok}
    lost = sum((r.seed, r.environment_id) in tested for r in group.failed)
    failed = f"; {lost} repeat{'s' if lost > 1 else ''} failed" if lost else ""
    if d.verdict == "untested":
        return f"untested (no repeats{failed or '; set repeats: 2'})"
    same = sum(p.verdict == "bitwise" for p in d.pairs)
    return f"{d.verdict} ({same}/{len(d.pairs)} pairs bitwise{failed})"


def failed_lines(groups: Iterable[Group]) -> list[str]:
    """One line per failed run: what it was, its error's first line, its file."""
    return [f"{run_name(r)} in {g.label}: {r.error} ({r.path})" for g in groups for r in g.failed]


def trial_counts(counts: dict[str, int]) -> str:
    """A search's trials after their number: ``(4 ok, 0 failed, 0 stopped early)``."""
    return f"({counts['n_ok']} ok, {counts['n_failed']} failed, {counts['n_stopped_early']} stopped early)"


def scores_cell(c: CrossEnvironment) -> str:
    """``max |Δscore| 3.2e-07 (rel 9.1e-07), ranking identical`` (or its Kendall tau)."""
    scores = c.scores()
    if scores is None:
        return "scores not comparable (other test images)"
    tau = f"ranking differs (Kendall tau {scores.kendall_tau:.3f})"
    ranking = "ranking identical" if scores.ranking_identical else tau
    return f"max |Δscore| {fmt_small(scores.max_abs)} (rel {fmt_small(scores.max_rel)}), {ranking}"


def mdd_cell(stat: Stat | None) -> str:
    """A metric's minimum detectable difference, or ``-`` (one seed, or no spread)."""
    return "-" if stat is None or stat.mdd is None else f"{stat.mdd:.3f}"


def seeds_needed_cell(c: Comparison) -> str:
    """``12``, ``more than 10000``, or ``-`` (no spread to size it by)."""
    if c.seeds_needed is not None:
        return str(c.seeds_needed)
    note = c.seeds_needed_note or "-"
    return note if note.startswith("more") else "-"


def seeds_range(a: Aggregate) -> str:
    """Seeds per category: ``30``, or ``3-5`` when categories differ."""
    lo, hi = min(map(len, a.values)), max(map(len, a.values))
    return str(lo) if lo == hi else f"{lo}-{hi}"


def p_cell(p: float, lo: float, hi: float) -> str:
    """``0.22 [0.00, 0.67]``: P(A>B) and its CI."""
    return f"{p:.2f} [{lo:.2f}, {hi:.2f}]"


def interval_cell(value: float, lo: float, hi: float) -> str:
    """``0.912 [0.884, 0.931]``."""
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else f"{value:.3f}"


def aggregate_tables(rep: CheckReport) -> tuple[Table | None, Table | None]:
    """Across categories: per model and metric, mean and IQM over categories and seeds; per pair
    of models, P(A>B) averaged over the categories both ran comparably."""
    rows: list[tuple[str, ...]] = [
        (
            a.label,
            a.metric,
            str(len(a.categories)),
            seeds_range(a),
            interval_cell(*a.estimates[:3]),
            interval_cell(*a.estimates[3:]),
        )
        for a in rep.aggregates
    ]
    header = ("model", "metric", "categories", "seeds", f"mean [{CI}]", f"IQM [{CI}]")
    pairs: list[tuple[str, ...]] = [
        (c.metric, c.a.label, c.b.label, str(len(c.categories)), p_cell(c.p, c.ci_low, c.ci_high), c.verdict)
        for c in rep.across
    ]
    pair_header = ("metric", "A", "B", "categories", f"P(A>B) [{CI}]", "verdict")
    return ((header, rows) if rows else None), ((pair_header, pairs) if pairs else None)


def sources_table(rep: CheckReport) -> Table | None:
    """Variance by source: per reference group and metric, each stream's own seed spread and
    its share of the reference's variance."""
    rows: list[tuple[str, ...]] = [
        (
            s.category,
            s.label,
            s.metric,
            s.source,
            str(s.n),
            f"{s.std:.4f}",
            f"{s.std_reference:.4f} ({s.n_reference})",
            "-" if s.share is None else interval_cell(s.share, s.share_low or 0.0, s.share_high or math.inf),
        )
        for s in rep.sources
    ]
    header = ("category", "reference", "metric", "source", "seeds", "std", "reference std (seeds)", f"share [{CI}]")
    return (header, rows) if rows else None


def cross_environment_lines(rep: CheckReport) -> list[str]:
    """Per group and pair of environments: verdict, score and metric differences, and the
    environment fields that differ."""
    lines = []
    for g in rep.groups:
        for c in g.cross_environment:
            auroc = c.deltas().get("image_AUROC")
            delta = f"; Δ image_AUROC {auroc['mean']:+.4f} (max {auroc['max_abs']:.4f})" if auroc else ""
            ratio = c.delta_over_seed_std()
            delta += f", {ratio:.2f} x seed std" if ratio is not None else ""
            differs = ", ".join(c.fingerprint_diff()) or "nothing recorded"
            lines.append(
                f"{g.label} {g.category}: {env_label(c.a)} vs {env_label(c.b)}, {len(c.pairs)} seeds: {c.verdict}; "
                f"{scores_cell(c)}{delta}; environment differs in {differs}"
            )
    return lines


def adaptive_table(rep: CheckReport) -> Table | None:
    """Per group (in each environment) of an adaptive seed study: how its rounds ended, or
    that they have not (an interrupted study; a rerun goes on)."""
    rows: list[tuple[str, ...]] = []
    for g in rep.views:
        a = g.adaptive
        if a is not None:
            width = "-" if a["halfwidth"] is None else f"{a['halfwidth']:.4f}"
            seeds = f"{a['seeds']} (max {a['max']})"
            rows.append((g.category, g.label, a["metric"], seeds, width, f"{a['target']:g}", a["outcome"]))
    header = ("category", "group", "metric", "seeds", f"{CI} half-width", "target", "outcome")
    return (header, rows) if rows else None


def to_text(rep: CheckReport) -> str:
    """The compact table ``harness check`` prints."""
    doc = rep.counts()
    lines = [
        f"checked {rep.store.where}: {doc['files']} records ({doc['ok']} ok, {doc['failed']} failed, "
        f"{doc['trials']} search trials), {doc['malformed']} malformed, {doc['corrupt']} corrupt; "
        f"tolerance {rep.tolerance:g}"
    ]
    rows: list[tuple[str, ...]] = []
    for g in rep.views:
        image = g.stats.get("image_AUROC")
        _, _, spread, cv = stat_cells(image)
        cells = (fmt_stat(image), spread, cv, mdd_cell(image), fmt_stat(g.stats.get("pixel_AUROC")))
        rows.append((g.category, g.label, str(len(g.seeds)), *cells, determinism_cell(g) if g.ok else "-"))
        rows[-1] += (str(len(g.failed)),)
    header: tuple[str, ...] = ("category", "group", "seeds", f"image_AUROC mean±std [{CI}]", "min-max", "CV", "MDD")
    header += ("pixel_AUROC", "determinism", "failed")
    lines += ["", *text_table(header, rows)] if rows else ["", "no test runs (only search trials)"]
    adaptive = adaptive_table(rep)
    if adaptive:
        lines += ["", "adaptive seeds, added in rounds until the CI half-width is at most the target:"]
        lines += ["  " + line for line in text_table(*adaptive)]
    failed = failed_lines(rep.groups)
    if failed:
        lines += ["", "failed runs (in no statistic):", *("  " + line for line in failed)]
    differing = [f"  {g.label} {g.category}: {line}" for g in rep.groups if (line := g.determinism.summary())]
    if differing:
        lines += ["", "same seed, same environment, different scores (--json lists every pair):", *differing]
    cross = cross_environment_lines(rep)
    if cross:
        lines += ["", "across environments (same seeds):", *("  " + line for line in cross)]
    if rep.comparisons:
        lines += ["", f"model comparison, P(A beats B) over seeds [{CI}]; seeds a side to detect {rep.detect:g}:"]
        pairs = [
            (
                c.category,
                c.metric,
                c.a.label,
                c.b.label,
                p_cell(c.p, c.ci_low, c.ci_high),
                c.verdict,
                seeds_needed_cell(c),
            )
            for c in rep.comparisons
        ]
        header = ("category", "metric", "A", "B", "P(A>B)", "verdict", f"seeds for {rep.detect:g}")
        lines += ["  " + line for line in text_table(header, pairs)]
    models, across = aggregate_tables(rep)
    if models:
        lines += ["", "across categories, over every category and seed (stratified bootstrap):"]
        lines += ["  " + line for line in text_table(*models)]
    if across:
        lines += ["", "across categories, P(A beats B) averaged over categories:"]
        lines += ["  " + line for line in text_table(*across)]
    sources = sources_table(rep)
    if sources:
        lines += ["", "variance by source, var(only this stream follows the seed) / var(reference):"]
        lines += ["  " + line for line in text_table(*sources)]
    held = held_lines(rep)
    lines += ["", *held] if held else []
    for s in rep.searches:
        where = f" in {s.variant}" if s.variant else ""
        head = f"search {s.sweep}/{s.model} {s.category}{where}: {s.counts['n_trials']} trials {trial_counts(s.counts)}"
        for g in s.best:
            sel = g.selection or {}
            test = fmt_stat(g.stats.get("image_AUROC"))
            head += f"; best {sel.get('metric')} {fmt_value(sel.get('value'))} -> test image_AUROC {test}"
        lines += ["", head]
    return "\n".join(lines) + "\n"


def held_tables(rep: CheckReport) -> tuple[Table | None, Table | None]:
    """Whether the conclusions hold in each environment: the comparisons made in two or more
    of them (P(A>B) and verdict in each; held if the verdicts agree), and the searches made
    in two or more (the winning configuration in each)."""
    envs = rep.environments
    cells: dict[tuple[str, str, str, str], dict[str, str]] = {}
    verdicts: dict[tuple[str, str, str, str], set[str]] = defaultdict(set)
    for c in rep.comparisons:
        env = c.environment
        if env is not None:
            key = (c.category, c.metric, c.a.base_label or c.a.label, c.b.base_label or c.b.label)
            cells.setdefault(key, {})[env] = f"{c.p:.2f} {c.verdict}"
            verdicts[key].add(c.verdict)
    rows = [
        (*key, *(by_env.get(e, "-") for e in envs), "yes" if len(verdicts[key]) == 1 else "NO")
        for key, by_env in cells.items()
        if len(by_env) > 1
    ]
    header = ("category", "metric", "A", "B", *(env_label(r) for r in envs.values()), "held")
    winners: list[tuple[str, ...]] = []
    for (sweep, model, category), searches in rep.search_winners():
        held = "yes" if rep.same_winner(searches) else "NO"
        for s in searches:  # each has trials: it is a search made in a known environment
            winners.append((f"{sweep}/{model}", category, env_label(s.trials[0]), config_label(s.winner or {}), held))
    winner_header: tuple[str, ...] = ("search", "category", "environment", "winner", "same winner")
    return ((header, rows) if rows else None), ((winner_header, winners) if winners else None)


def held_lines(rep: CheckReport) -> list[str]:
    """``held_tables`` as text."""
    comparisons, searches = held_tables(rep)
    lines: list[str] = []
    if comparisons:
        lines += ["model comparison per environment, P(A>B) and verdict:"]
        lines += ["  " + line for line in text_table(*comparisons)]
    if searches:
        lines += [*([""] if lines else []), "search winners per environment:"]
        lines += ["  " + line for line in text_table(*searches)]
    return lines
