"""Live progress of a sweep on stdout, and its tally: one line per event, runs named one way."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from harness.formatting import Nameable, fmt_duration, fmt_metrics, run_name
from harness.record import RunRecord

ETA_AFTER = 3  # runs finished before an ETA is shown: the first ones carry start-up, not work


@dataclass
class Progress:
    """Runs done / failed / total, and an ETA once it means something."""

    total: int
    out: TextIO = sys.stdout
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: int = 0
    lost: list[str] = field(default_factory=list)
    _first_done: float | None = None  # when the first run finished: the ETA's clock starts there

    @property
    def finished(self) -> int:
        return self.ok + len(self.failed) + self.skipped + len(self.lost)

    def eta(self) -> str | None:
        """Time left at the rate runs finished since the first did; None before ETA_AFTER runs
        (the first finish after the cluster started, workers imported, features were extracted)."""
        ran = self.ok + len(self.failed) + len(self.lost)
        left = self.total - self.finished
        if not left:
            return fmt_duration(0)
        if ran < ETA_AFTER or self._first_done is None:
            return None
        rate = (ran - 1) / max(time.monotonic() - self._first_done, 1e-9)
        return fmt_duration(left / rate)

    def event(self, what: str) -> None:
        counts = f"{self.finished}/{self.total} done, {len(self.failed)} failed, {self.skipped} already stored"
        eta = self.eta()
        print(f"[{counts}{f', eta {eta}' if eta else ''}] {what}", file=self.out, flush=True)

    def _ran(self) -> None:
        if self._first_done is None:
            self._first_done = time.monotonic()

    def record(self, record: RunRecord) -> None:
        self._ran()
        name = run_name(record)
        if record.ok:
            self.ok += 1
            self.event(f"ok {name} {fmt_metrics(record.metrics)} ({record.timing.total_s:.1f}s)")
        else:
            self.failed.append(f"{name}: {record.first_error_line()}")
            self.event(f"FAILED {self.failed[-1]}")

    def stored(self, run: Nameable) -> None:
        self.skipped += 1
        self.event(f"already stored {run_name(run)}")

    def lose(self, run: Nameable | str, why: str) -> None:
        self._ran()
        self.lost.append(f"{run if isinstance(run, str) else run_name(run)}: {why}")
        self.event(f"LOST {self.lost[-1]}")


@dataclass
class SweepResult:
    ok: int
    failed: list[str]
    skipped: int
    lost: list[str]

    @property
    def clean(self) -> bool:
        return not (self.failed or self.lost)

    def summary(self, name: str) -> list[str]:
        """The lines ``harness sweep`` ends with: counts, then each run that failed or was lost."""
        return [
            f"sweep {name}: {self.ok} ok, {len(self.failed)} failed, {len(self.lost)} lost, "
            f"{self.skipped} already stored",
            *(f"  failed: {line}" for line in self.failed),
            *(f"  lost (not stored; rerun the sweep to retry): {line}" for line in self.lost),
        ]

    def add(self, progress: Progress) -> None:
        self.ok += progress.ok
        self.failed += progress.failed
        self.skipped += progress.skipped
        self.lost += progress.lost
