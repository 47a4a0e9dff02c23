from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harness.fsutil import atomic_write_bytes, atomic_write_json
from harness.store import ResultsStore


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b.json"
    atomic_write_json(path, {"b": 1, "a": [1.5]})
    assert path.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
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


def test_nan_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        atomic_write_json(tmp_path / "r.json", {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_store_skips_unfinished_temp_files(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.put({"sweep": "s", "run_id": "abc", "status": "ok"})
    (tmp_path / "s" / "runs" / ".def.json.x1y2.tmp").write_text('{"half":')
    assert [p.name for p in store.paths()] == ["abc.json"]
    assert store.get("s", "abc") == {"run_id": "abc", "status": "ok", "sweep": "s"}
    assert store.get("s", "nope") is None
