"""The indexes beside the records (the checker's, the frames', the statistics memo): a rerun
reads and computes only what changed, and never answers other than the records say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pandas as pd
import pytest

import harness.analysis
import harness.check.groups
import harness.check.index
import harness.check.load
import harness.check.pairs
from harness.analysis import FRAME_INDEX, load_runs
from harness.check import check
from harness.check.index import INDEX, read_index
from harness.check.load import FileState
from harness.check.memo import MEMO_DIR, write_framed
from tests.recordkit import make_record, scores_for, write_records

REPO = Path(__file__).resolve().parent.parent


def study(root: Path) -> list[dict[str, Any]]:
    """Two configurations x 4 seeds x 2 repeats (the second one's repeats differ a little), a
    failed run and a malformed file."""
    recs = [make_record(seed=s, repeat=r, scores=scores_for(0.8 + 0.02 * s)) for s in range(4) for r in range(2)]
    other = {**make_record()["params"], "model_args": {"backbone": "resnet18", "coreset": 0.2}}
    for s in range(4):
        for r in range(2):
            scores = [x + 1e-9 * r for x in scores_for(0.7 + 0.04 * s)]
            recs.append(make_record(sweep="s2", seed=s, repeat=r, params=other, scores=scores))
    recs.append(make_record(seed=9, status="failed", metrics={}, predictions=None))
    write_records(root, recs)
    (root / "s1" / "runs" / "zzzz.json").write_text("{")
    return recs


def answer(root: Path) -> dict[str, Any]:
    return check(root).to_json()


@pytest.fixture(autouse=True)
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records written a moment before an index count as older than it (as minutes later
    they do): the racy window has its own test."""
    monkeypatch.setattr(harness.check.index, "RACY_NS", 0)
    monkeypatch.setattr(harness.analysis, "RACY_NS", 0)


def test_a_rerun_parses_and_computes_nothing_and_answers_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study(tmp_path)
    first = answer(tmp_path)
    assert (tmp_path / "s1" / INDEX).is_file()
    assert (tmp_path / MEMO_DIR / "stats.bin").is_file()

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("recomputed")

    monkeypatch.setattr(harness.check.load, "decode_record", never)
    monkeypatch.setattr(harness.check.groups, "bootstrap_means", never)
    monkeypatch.setattr(harness.check.groups, "probability_of_improvement", never)
    monkeypatch.setattr(harness.check.pairs.ScoreDiff, "of", never)
    assert answer(tmp_path) == first


def test_a_changed_added_or_removed_record_is_seen_by_the_next_check(tmp_path: Path) -> None:
    recs = study(tmp_path)
    answer(tmp_path)
    changed = make_record(seed=0, repeat=0, scores=scores_for(0.5))  # same run id, other scores
    assert changed["run_id"] == recs[0]["run_id"]
    write_records(tmp_path, [changed, make_record(seed=5, scores=scores_for(0.9))])
    (tmp_path / "s2" / "runs" / f"{recs[8]['run_id']}.json").unlink()
    doc = answer(tmp_path)
    for root in tmp_path.glob("*/index"):
        for f in root.iterdir():
            f.unlink()
    (tmp_path / MEMO_DIR / "stats.bin").unlink()
    assert doc == answer(tmp_path), "the index's answer is the records' answer"
    s1 = next(g for g in doc["groups"] if g["sweep"] == "s1")
    assert s1["seeds"] == [0, 1, 2, 3, 5]
    assert s1["determinism"]["verdict"] == "diverged"
    assert next(g for g in doc["groups"] if g["sweep"] == "s2")["n_runs"] == 7


def test_a_record_edited_in_place_with_its_time_set_back_is_seen(tmp_path: Path) -> None:
    """Same inode, same size, the modification time restored: the change time still moved."""
    recs = study(tmp_path)
    answer(tmp_path)
    path = tmp_path / "s1" / "runs" / f"{recs[0]['run_id']}.json"
    before = path.stat()
    text = path.read_text()
    edited = text.replace('"seed": 0', '"seed": 7')  # same length
    assert len(edited) == len(text)
    assert edited != text
    time.sleep(0.01)
    with open(path, "r+") as f:
        f.write(edited)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    s1 = next(g for g in answer(tmp_path)["groups"] if g["sweep"] == "s1")
    assert 7 in s1["seeds"]


def test_a_record_changed_in_the_tick_the_index_was_written_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second change in the clock tick of the first keeps size and times: the index's entry
    then matches the changed file. Made here by giving the entry the changed file's state."""
    monkeypatch.setattr(harness.check.index, "RACY_NS", 2_000_000_000)
    recs = study(tmp_path)
    answer(tmp_path)
    path = tmp_path / "s1" / "runs" / f"{recs[0]['run_id']}.json"
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 7'))
    index = read_index(tmp_path, "s1")
    assert index is not None
    rel = f"s1/runs/{path.name}"
    index.entries[rel] = msgspec.structs.replace(index.entries[rel], state=FileState.of(path.stat()))
    index.written_ns = path.stat().st_ctime_ns + 1_000_000  # a millisecond after the change
    write_framed(tmp_path / "s1" / INDEX, harness.check.index._code(), msgspec.msgpack.encode(index))
    s1 = next(g for g in answer(tmp_path)["groups"] if g["sweep"] == "s1")
    assert 7 in s1["seeds"]


def test_a_touched_record_is_hashed_not_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = study(tmp_path)
    first = answer(tmp_path)
    os.utime(tmp_path / "s1" / "runs" / f"{recs[1]['run_id']}.json")  # a copy or a touch: same bytes
    parsed: list[bytes] = []
    decode = harness.check.load.decode_record
    monkeypatch.setattr(harness.check.load, "decode_record", lambda b: parsed.append(b) or decode(b))
    assert answer(tmp_path) == first
    assert parsed == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other code", "empty"])
def test_a_damaged_index_or_memo_is_rebuilt(tmp_path: Path, damage: str) -> None:
    study(tmp_path)
    first = answer(tmp_path)
    for path in (tmp_path / "s1" / INDEX, tmp_path / MEMO_DIR / "stats.bin"):
        data = path.read_bytes()
        broken = {
            "truncated": data[: len(data) // 2],
            "garbage": data[:40] + bytes(len(data) - 40),
            "other code": data[:14] + b"\xff" * 16 + data[30:],  # the code hash after the magic line
            "empty": b"",
        }[damage]
        path.write_bytes(broken)
    assert answer(tmp_path) == first
    assert (tmp_path / "s1" / INDEX).read_bytes() != broken, "rewritten whole"
    assert answer(tmp_path) == first


def test_a_store_whose_index_cannot_be_written_is_checked_without_one(tmp_path: Path) -> None:
    """(As root, permissions do not stop a write: a file where the index folder goes does.)"""
    study(tmp_path)
    for sweep in ("s1", "s2"):
        (tmp_path / sweep / "index").write_text("in the way")
    (tmp_path / MEMO_DIR).write_text("in the way")
    first = answer(tmp_path)
    assert first == answer(tmp_path)
    assert first["records"]["ok"] == 16
    assert first["records"]["malformed"] == 1
    assert (tmp_path / "s1" / "index").read_text() == "in the way"


def test_concurrent_checks_and_a_writer_leave_an_index_that_answers_as_the_records_do(tmp_path: Path) -> None:
    study(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    checks = [
        subprocess.Popen(
            [sys.executable, "-m", "harness", "check", str(tmp_path), "--json"], env=env, stdout=subprocess.PIPE
        )
        for _ in range(3)
    ]
    write_records(tmp_path, [make_record(seed=s, repeat=r) for s in range(10, 30) for r in range(2)])
    for proc in checks:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert json.loads(out)["schema"] == "harness.check/1"
    warm = answer(tmp_path)
    for index in tmp_path.glob("*/index/*"):
        index.unlink()
    assert warm == answer(tmp_path)
    assert warm["records"]["ok"] == 56


def test_the_frame_index_gives_the_frame_the_records_give(tmp_path: Path) -> None:
    recs = study(tmp_path)
    cold = load_runs(tmp_path)
    assert (tmp_path / "s1" / FRAME_INDEX).is_file()
    pd.testing.assert_frame_equal(load_runs(tmp_path), cold)
    write_records(tmp_path, [make_record(seed=0, repeat=0, scores=scores_for(0.5)), make_record(seed=6)])
    (tmp_path / "s2" / "runs" / f"{recs[8]['run_id']}.json").unlink()
    (tmp_path / "s2" / FRAME_INDEX).write_bytes(b"ARROW1 truncated")
    changed = load_runs(tmp_path)
    for index in tmp_path.glob("*/index/runs.arrow"):
        index.unlink()
    pd.testing.assert_frame_equal(changed, load_runs(tmp_path))
    assert len(changed) == len(recs) + 1 - 1
    assert changed.loc[changed["run_id"] == recs[0]["run_id"], "metrics.image_AUROC"].item() == 0.5
    only = load_runs(tmp_path, sweeps=["s1"], statuses=["failed"])
    assert list(only["status"]) == ["failed"]
    assert list(only["seed"]) == [9]


def test_harness_check_prints_a_remembered_answer_only_for_the_same_records_and_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import main

    study(tmp_path)
    tampered = make_record(sweep="s3", seed=1, metrics={"image_AUROC": 0.99}, scores=scores_for(0.8))
    write_records(tmp_path, [tampered])  # corrupt: --strict fails
    assert main(["check", str(tmp_path), "--json", "--strict"]) == 1
    first = capsys.readouterr().out
    verdicts = harness.check.groups._verdicts

    def never(*args: Any) -> Any:
        raise AssertionError("recomputed")

    monkeypatch.setattr(harness.check.groups, "_verdicts", never)
    assert main(["check", str(tmp_path), "--json", "--strict"]) == 1
    assert capsys.readouterr().out == first
    monkeypatch.setattr(harness.check.groups, "_verdicts", verdicts)
    assert main(["check", str(tmp_path), "--json", "--tolerance", "0.1"]) == 0  # other arguments
    assert json.loads(capsys.readouterr().out)["tolerance"] == 0.1
    write_records(tmp_path, [make_record(seed=0, repeat=0, scores=scores_for(0.5))])  # other records
    assert main(["check", str(tmp_path), "--json", "--tolerance", "0.1"]) == 0
    s1 = next(g for g in json.loads(capsys.readouterr().out)["groups"] if g["sweep"] == "s1")
    assert s1["metrics"]["image_AUROC"]["min"] == pytest.approx(0.65)  # seed 0: repeats 0.5 and 0.8
