"""The checker's answer in words: the table ``harness check`` prints, and the cells and lines
the report shares with it."""

from __future__ import annotations

from collections.abc import Iterable

from harness.check.groups import CheckReport, Group
from harness.check.stats import CI
from harness.formatting import fmt_stat, fmt_value, run_name, stat_cells, text_table


def determinism_cell(group: Group) -> str:
    """``bitwise (3/3 pairs bitwise)``; without repeats, how to test it."""
    d = group.determinism
    tested = {(r.seed, r.hardware_id) for r in group.ok}
    lost = sum((r.seed, r.hardware_id) in tested for r in group.failed)
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


def to_text(rep: CheckReport) -> str:
    """The compact table ``harness check`` prints."""
    doc = rep.counts()
    lines = [
        f"checked {rep.store.root}: {doc['files']} records ({doc['ok']} ok, {doc['failed']} failed, "
        f"{doc['trials']} search trials), {doc['malformed']} malformed, {doc['corrupt']} corrupt; "
        f"tolerance {rep.tolerance:g}"
    ]
    rows: list[tuple[str, ...]] = []
    for g in rep.groups:
        image = g.stats.get("image_AUROC")
        _, _, spread, cv = stat_cells(image)
        cells = (fmt_stat(image), spread, cv, fmt_stat(g.stats.get("pixel_AUROC")))
        rows.append((g.category, g.label, str(len(g.seeds)), *cells, determinism_cell(g) if g.ok else "-"))
        rows[-1] += (str(len(g.failed)),)
    header: tuple[str, ...] = ("category", "group", "seeds", f"image_AUROC mean±std [{CI}]", "min-max", "CV")
    header += ("pixel_AUROC", "determinism", "failed")
    lines += ["", *text_table(header, rows)] if rows else ["", "no test runs (only search trials)"]
    failed = failed_lines(rep.groups)
    if failed:
        lines += ["", "failed runs (in no statistic):", *("  " + line for line in failed)]
    differing = [f"  {g.label} {g.category}: {line}" for g in rep.groups if (line := g.determinism.summary())]
    if differing:
        lines += ["", "same seed, same hardware, different scores (--json lists every pair):", *differing]
    cross = [(g, c) for g in rep.groups for c in g.cross_hardware]
    if cross:
        lines += ["", "across hardware (same seeds):"]
        for g, c in cross:
            auroc = c.deltas().get("image_AUROC")
            delta = f"; image_AUROC delta {auroc['mean']:+.4f} (max {auroc['max_abs']:.4f})" if auroc else ""
            lines.append(
                f"  {g.label} {g.category} {c.hardware_a} vs {c.hardware_b}, {len(c.pairs)} seeds: {c.verdict}"
                f"{delta}; environment differs in {', '.join(c.fingerprint_diff()) or 'nothing recorded'}"
            )
    if rep.comparisons:
        lines += ["", f"model comparison, P(A beats B) over seeds [{CI}]:"]
        pairs = [
            (c.category, c.metric, c.a.label, c.b.label, f"{c.p:.2f} [{c.ci_low:.2f}, {c.ci_high:.2f}]", c.verdict)
            for c in rep.comparisons
        ]
        lines += ["  " + line for line in text_table(("category", "metric", "A", "B", "P(A>B)", "verdict"), pairs)]
    for s in rep.searches:
        head = f"search {s.sweep}/{s.model} {s.category}: {s.counts['n_trials']} trials {trial_counts(s.counts)}"
        for g in s.best:
            sel = g.selection or {}
            test = fmt_stat(g.stats.get("image_AUROC"))
            head += f"; best {sel.get('metric')} {fmt_value(sel.get('value'))} -> test image_AUROC {test}"
        lines += ["", head]
    return "\n".join(lines) + "\n"
