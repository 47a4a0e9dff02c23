"""Read W&B offline runs back from their ``.wandb`` files, as ``wandb sync`` would upload them.

wandb 0.31 ships no Python reader, so this is one: the file is a LevelDB-style log (a 7-byte
``:W&B`` header, then 32 KiB blocks of CRC-checked chunks), each whole record a protobuf
``wandb_internal_pb2.Record``. Only what the tests assert on is gathered.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_HEADER = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every protobuf record of one ``.wandb`` file, checksums verified."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    pos, buf = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if (crc, length, kind) == (0, 0, 0):
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pos += _HEADER + length
        buf = chunk if kind in (_FULL, _FIRST) else buf + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


@dataclass
class OfflineRun:
    """One offline run as W&B will show it after ``wandb sync``."""

    dir: Path
    id: str = ""
    project: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    artifacts: dict[str, list[str]] = field(default_factory=dict)  # name -> file paths in it
    staged: list[Path] = field(default_factory=list)  # the local files `wandb sync` uploads them from
    exit_code: int | None = None

    def table(self, key: str) -> dict[str, Any]:
        """A logged ``wandb.Table`` (columns and data) from the run's media files."""
        return json.loads((self.dir / "files" / self.summary[key]["path"]).read_text())


def _update(target: dict[str, Any], items: Any) -> dict[str, Any]:
    """Apply W&B's key/value items (a nested key is a path into dicts) to ``target``."""
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        node = target
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = json.loads(item.value_json)
    return target


def read_run(run_dir: Path) -> OfflineRun:
    (log,) = run_dir.glob("run-*.wandb")
    run = OfflineRun(run_dir)
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.id, run.project, run.group, run.job_type = r.run_id, r.project, r.run_group, r.job_type
            run.name, run.tags = r.display_name, list(r.tags)
            _update(run.config, r.config.update).pop("_wandb", None)
        elif kind == "config":
            _update(run.config, rec.config.update).pop("_wandb", None)
        elif kind == "summary":
            _update(run.summary, rec.summary.update)
        elif kind == "history":
            run.history.append(_update({}, rec.history.item))
        elif kind == "files":
            run.files += [f.path for f in rec.files.files]
        elif kind == "artifact":
            run.artifacts[rec.artifact.name] = [c.path for c in rec.artifact.manifest.contents]
            run.staged += [Path(c.local_path) for c in rec.artifact.manifest.contents]
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def offline_runs(wandb_dir: Path) -> dict[str, list[OfflineRun]]:
    """Every offline run under a ``wandb/`` folder, by run id (a run logged twice has two)."""
    out: dict[str, list[OfflineRun]] = {}
    for d in sorted(wandb_dir.glob("offline-run-*")):
        run = read_run(d)
        out.setdefault(run.id, []).append(run)
    return out
