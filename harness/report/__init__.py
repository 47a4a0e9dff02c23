"""The stability report: markdown a reviewer reads on GitHub, with PNG plots beside it.

Built from the checker's answer only, so it needs the store and nothing else. The same store
gives the same bytes: rows are sorted, the only times shown are the records' own, and plots
are drawn without timestamps (matplotlib's PNG writer adds none).

- ``sections``: the markdown, section by section (``StabilityReport``);
- ``plots``: the figures; ``reproduce``: the ``harness run`` loops; ``references``: published numbers.

Figures are most of a report's time (seconds each), so ``write_report`` can keep them in a
cache folder, each under a hash of its data and drawing code: a report of an unchanged store
draws nothing, and one of a changed store draws only the figures whose data changed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from harness.check import CheckReport
from harness.fsutil import atomic_write_bytes
from harness.report.plots import Plot, draw_all, plot_key
from harness.report.references import MVTEC_TEST_IMAGES
from harness.report.sections import STABILITY_COLUMNS, StabilityReport

__all__ = ["MVTEC_TEST_IMAGES", "STABILITY_COLUMNS", "StabilityReport", "default_out", "report_command", "write_report"]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the last chunk: a file cut short lacks it
CACHE_FILES = 200  # past this many figures, the cache forgets those used longest ago


def report_command(results: Path | list[Path], sweep: str = "*", out: Path | None = None) -> str:
    """The ``harness report`` line that rebuilds a report: printed in its header."""
    only = f" --sweep {sweep}" if sweep != "*" else ""
    where = " ".join(map(str, results if isinstance(results, list) else [results]))
    return f"harness report {where}{only}" + (f" --out {out}" if out else "")


def default_out(check: CheckReport) -> Path:
    sweeps = sorted({r.sweep for r in check.store.runs})
    return Path("reports") / f"{sweeps[0] if len(sweeps) == 1 else check.store.root.resolve().name}.md"


def write_report(check: CheckReport, out: Path, command: str, cache: Path | None = None) -> tuple[Path, list[Path]]:
    """Write ``out`` and its plots (in the folder ``<stem>/`` beside it), each atomically.

    Plots of an earlier report of the same name that this one no longer has are removed.
    ``cache``: a folder of the figures drawn before, each under a hash of its data and drawing
    code (``_cached_pngs``), so that a report of an unchanged store draws none.
    """
    report = StabilityReport(check, command, out.stem)
    plot_dir = out.parent / out.stem
    names = {f"{key}.png": data for key, data in sorted(_cached_pngs(report.plots(), cache).items())}
    for name, data in names.items():
        atomic_write_bytes(plot_dir / name, data)
    for old in plot_dir.glob("*.png"):
        if old.name not in names and old.name.startswith(("seeds-", "search-", "environments-", "profile-")):
            old.unlink()
    atomic_write_bytes(out, report.render([f"{out.stem}/{n}" for n in sorted(names)]).encode())
    return out, [plot_dir / n for n in sorted(names)]


def _cached_pngs(plots: dict[str, Plot], cache: Path | None) -> dict[str, bytes]:
    """Each plot's PNG by name: read from ``cache / f"{plot_key(plot)}.png"`` where a whole PNG is
    there, else drawn (in worker processes when several are) and stored there for next time.

    The cache only saves time: a file that is not a whole PNG is drawn again, and a cache that
    cannot be written (a read-only results folder) leaves the report as it would be without one.
    """
    paths = {name: cache / f"{plot_key(plot)}.png" for name, plot in plots.items()} if cache else {}
    pngs = {name: png for name, path in paths.items() if (png := _read_png(path)) is not None}
    missing = [name for name in plots if name not in pngs]
    pngs |= dict(zip(missing, draw_all([plots[name] for name in missing]), strict=True))
    if cache:
        for name in missing:
            with contextlib.suppress(OSError):
                atomic_write_bytes(paths[name], pngs[name])
        _forget_unused(cache, set(paths.values()))
    return pngs


def _read_png(path: Path) -> bytes | None:
    """The PNG at ``path`` if it is whole, touched so that its mtime says when it was last used."""
    try:
        png = path.read_bytes()
    except OSError:
        return None
    if not (png.startswith(PNG_SIGNATURE) and png.endswith(PNG_END)):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)
    return png


def _forget_unused(cache: Path, used: set[Path]) -> None:
    """Past ``CACHE_FILES`` figures, remove those least recently used, never one of this report's.

    Best effort: a file another report removes first, or a folder that cannot be written, stops
    it until the next report.
    """
    with contextlib.suppress(OSError):
        files = list(cache.glob("*.png"))
        unused = sorted((p for p in files if p not in used), key=lambda p: p.stat().st_mtime)
        for path in unused[: max(0, len(files) - CACHE_FILES)]:
            path.unlink()
