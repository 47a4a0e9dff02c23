from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harness.fsutil import atomic_write_bytes
from harness.record import encode_record
from harness.store import ResultsStore
from tests.recordkit import make_record, typed


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    atomic_write_bytes(path, b"{}")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_write_that_dies_before_the_rename_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.json"
    atomic_write_bytes(path, b"old")

    def killed(src: str, dst: str) -> None:
        assert Path(src).read_bytes() == b"new, whole", "the temp file is complete before the rename"
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new, whole")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_record_file_has_sorted_keys_and_equal_records_equal_bytes() -> None:
    data = encode_record(typed(make_record()))
    assert data == encode_record(typed(make_record()))
    assert data.startswith(b'{\n  "category": "disc",\n  "data": {\n')
    assert data.endswith(b"}\n")


@pytest.mark.parametrize("where", ["score", "metric"])
def test_nan_is_refused_before_anything_is_written(tmp_path: Path, where: str) -> None:
    doc = make_record()
    if where == "score":
        doc["predictions"]["image_scores"][0] = float("nan")
    else:
        doc["metrics"]["image_AUROC"] = float("nan")
    with pytest.raises(ValueError, match="not a finite number"):
        ResultsStore(tmp_path).put(typed(doc))
    assert list(tmp_path.iterdir()) == []


def test_store_skips_unfinished_temp_files(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    record = typed(make_record(sweep="s"))
    store.put(record)
    (tmp_path / "s" / "runs" / ".def.json.x1y2.tmp").write_text('{"half":')
    assert [p.name for p in store.paths()] == [f"{record.run_id}.json"]
    assert store.get("s", record.run_id) == record
    assert store.get("s", "nope") is None
