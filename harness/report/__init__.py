"""The stability report: markdown a reviewer reads on GitHub, with PNG plots beside it.

Built from the checker's answer only, so it needs the store and nothing else. The same store
gives the same bytes: rows are sorted, the only times shown are the records' own, and plots
are drawn without timestamps (matplotlib's PNG writer adds none).

- ``sections``: the markdown, section by section (``StabilityReport``);
- ``plots``: the figures; ``reproduce``: the ``harness run`` loops; ``references``: published numbers.
"""

from __future__ import annotations

from pathlib import Path

from harness.check import CheckReport
from harness.fsutil import atomic_write_bytes
from harness.report.references import MVTEC_TEST_IMAGES
from harness.report.sections import STABILITY_COLUMNS, StabilityReport

__all__ = ["MVTEC_TEST_IMAGES", "STABILITY_COLUMNS", "StabilityReport", "default_out", "report_command", "write_report"]


def report_command(results: Path | list[Path], sweep: str = "*", out: Path | None = None) -> str:
    """The ``harness report`` line that rebuilds a report: printed in its header."""
    only = f" --sweep {sweep}" if sweep != "*" else ""
    where = " ".join(map(str, results if isinstance(results, list) else [results]))
    return f"harness report {where}{only}" + (f" --out {out}" if out else "")


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
        if old.name not in names and old.name.startswith(("seeds-", "search-", "environments-")):
            old.unlink()
    atomic_write_bytes(out, report.render([f"{out.stem}/{n}" for n in sorted(names)]).encode())
    return out, [plot_dir / n for n in sorted(names)]
