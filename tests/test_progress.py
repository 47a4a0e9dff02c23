"""Sweep progress lines: one per event, runs named one way, an ETA only once it means something."""

from __future__ import annotations

import io
import re

from msgspec.structs import replace

from harness.sweep.progress import ETA_AFTER, Progress
from tests.recordkit import make_record, typed


def test_no_eta_until_runs_have_finished_after_the_first_then_one_per_line() -> None:
    out = io.StringIO()
    progress = Progress(total=6, out=out)
    progress.event("a worker is importing anomalib (its first run)")
    for seed in range(ETA_AFTER + 1):
        progress.record(typed(make_record(seed=seed)))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[0/6 done, 0 failed, 0 already stored] a worker is importing anomalib (its first run)"
    assert lines[1].startswith("[1/6 done, 0 failed, 0 already stored] ok patchcore disc seed=0 r0 image_AUROC=0.9000")
    assert all("eta" not in line for line in lines[:ETA_AFTER])
    assert all(
        re.match(r"\[\d/6 done, 0 failed, 0 already stored, eta \d+m\d\ds\] ok ", ln) for ln in lines[ETA_AFTER:]
    )


def test_failed_lost_and_stored_runs_are_counted_and_named() -> None:
    out = io.StringIO()
    progress = Progress(total=3, out=out)
    failed = typed(make_record(seed=1, status="failed"))
    progress.record(failed)
    progress.stored(typed(make_record(seed=2)))
    progress.lose(replace(failed, seed=3), "NodeDiedError: the node died")
    assert progress.failed == ["patchcore disc seed=1 r0: OutOfMemoryError: CUDA out of memory (at run.py:301)"]
    assert progress.lost == ["patchcore disc seed=3 r0: NodeDiedError: the node died"]
    assert (progress.ok, progress.skipped, progress.finished) == (0, 1, 3)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("[3/3 done, 1 failed, 1 already stored, eta 0m00s] LOST patchcore disc seed=3 r0: ")
