"""The store under concurrent writers: whole records or none, never a half-written one."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from msgspec.structs import replace

from harness.store import ResultsStore
from tests.recordkit import make_record, typed

N_IDS = 8


def _write(root: str, writer: int, rounds: int) -> None:
    store = ResultsStore(Path(root))
    base = typed(make_record(sweep="s"))
    for i in range(rounds):
        for k in range(N_IDS):
            # Big enough that a torn write would show as invalid JSON or a short payload.
            run = {"writer": writer, "round": i}
            store.put(replace(base, run_id=f"run{k}", selection=run, error="x" * 200_000))


def test_concurrent_writers_never_leave_a_partial_record(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write, args=(str(tmp_path), w, 15)) for w in range(4)]
    for p in writers:
        p.start()
    store = ResultsStore(tmp_path)
    seen = 0
    while any(p.is_alive() for p in writers):
        for path in store.paths():  # what a reader sees mid-write: only whole files
            try:
                doc = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            assert len(doc["error"]) == 200_000
            seen += 1
    for p in writers:
        p.join()
        assert p.exitcode == 0
    records = store.records("s")
    assert sorted(records) == [f"run{k}" for k in range(N_IDS)]
    assert all((r.selection or {})["round"] == 14 for r in records.values())  # the last write wins, whole
    assert not [p for p in (tmp_path / "s" / "runs").iterdir() if p.name.startswith(".")]  # no temp files left
    assert seen > 0


def test_a_damaged_file_is_no_record(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    good = typed(make_record(sweep="s"))
    store.put(good)
    (tmp_path / "s" / "runs" / "torn.json").write_text('{"sweep": "s", "run_id": "to')
    store.put(replace(good, run_id="not-its-name"))
    (tmp_path / "s" / "runs" / "not-its-name.json").rename(tmp_path / "s" / "runs" / "other.json")
    (tmp_path / "s" / "runs" / "partial.json").write_text('{"sweep": "s", "run_id": "partial"}')
    (tmp_path / "s" / "runs" / f".{good.run_id}.json.tmp").write_text("{")
    assert list(store.records("s")) == [good.run_id]
