"""Results as pandas DataFrames: the records, their per-image scores, and the checker's answer.

For notebooks and scripts (docs/analysis.md). A run's row holds every field of its record,
nested blocks flattened to dotted column names (``params.model_args.backbone``,
``metrics.image_AUROC``, ``environment.torch_build.cpu_capability``); the per-image arrays
(paths, labels, scores) are the long-form ``load_scores`` instead. The checker's frames come
from the same computation ``harness check`` prints (``check_frames``).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec

from harness.check.index import RACY_NS
from harness.check.load import FileState, read_file, settings_id
from harness.check.memo import code_hash
from harness.errors import HarnessError
from harness.formatting import flatten
from harness.fsutil import atomic_write_bytes
from harness.record import RunRecord, decode_record
from harness.store import ResultsStore

if TYPE_CHECKING:
    import pandas as pd

    from harness.check.groups import CheckReport

# The per-image arrays: in ``load_scores``, not in a run's row.
ARRAYS = ("predictions.image_paths", "predictions.labels", "predictions.image_scores")
# Columns every runs frame has, in this order, whatever its records hold.
IDENTITY = ("run_id", "sweep", "study", "model", "category", "seed", "repeat", "role", "status", "error")
# Fixed dtypes: counts and ids as they are; measurements as floats (NaN where a run has none).
INT_COLUMNS = ("seed", "repeat")
FLOAT_PREFIXES = ("metrics.", "timing.")
NULLABLE_INT_PREFIXES = ("memory.",)


def records(
    results: Path | str,
    sweeps: Iterable[str] | None = None,
    roles: Iterable[str] | None = None,
    statuses: Iterable[str] | None = None,
) -> Iterator[RunRecord]:
    """The records under ``results`` (of these sweeps, roles and statuses: None for all), in
    path order; a file that is not a record is skipped (``harness check`` lists those)."""
    store, names = _sweeps(results, sweeps)
    keep_roles = set(roles) if roles is not None else None
    keep_statuses = set(statuses) if statuses is not None else None
    for name in names:
        for record in store.records(name).values():
            if (keep_roles is None or record.role in keep_roles) and (
                keep_statuses is None or record.status in keep_statuses
            ):
                yield record


def _sweeps(results: Path | str, sweeps: Iterable[str] | None) -> tuple[ResultsStore, list[str]]:
    """The store and the sweeps asked for (``["*"]``: all), each known to be there."""
    store = ResultsStore(Path(results))
    names = sorted(set(sweeps)) if sweeps is not None else ["*"]
    for name in names:
        store.require(name)
    return store, names


def run_row(record: RunRecord) -> dict[str, Any]:
    """A record as one row: every field but the per-image arrays, dotted; and its
    ``config_id``, the checker's (a group is sweep, model, category, role and config_id)."""
    row = flatten(msgspec.to_builtins(record), keep_empty=True)
    for key in ARRAYS:
        row.pop(key, None)
    row["config_id"] = settings_id(record.params)[0]
    return row


def load_runs(
    results: Path | str,
    sweeps: Iterable[str] | None = None,
    roles: Iterable[str] | None = None,
    statuses: Iterable[str] | None = None,
) -> pd.DataFrame:
    """One row per run record (failed runs and HPO trials included unless filtered out).

    ``roles``: ``run`` (a study's runs), ``trial`` (an HPO trial, scored on validation),
    ``best`` (a search's best configuration on the test split). ``statuses``: ``ok``, ``failed``.
    Each sweep's rows come from its frame index (``RESULTS/<sweep>/index/runs.arrow``),
    brought up to date first: only new or changed record files are read.
    """
    import pandas as pd

    store, names = _sweeps(results, sweeps)
    parts = [_sweep_rows(store.root, sweep) for sweep in (store.sweeps() if names == ["*"] else names)]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(frame):
        keep = pd.Series(True, index=frame.index)
        if roles is not None:
            keep &= frame["role"].isin(set(roles))
        if statuses is not None:
            keep &= frame["status"].isin(set(statuses))
        frame = frame[keep].reset_index(drop=True)
    frame = frame.drop(columns=[c for c in STATE if c in frame])
    for column in IDENTITY:
        if column not in frame:
            frame[column] = pd.Series(dtype="int64" if column in INT_COLUMNS else "object")
    rest = sorted(c for c in frame.columns if c not in IDENTITY)
    frame = frame[[*IDENTITY, *rest]]
    for column in frame.columns:
        if column in INT_COLUMNS:
            frame[column] = frame[column].astype("int64")
        elif column.startswith(FLOAT_PREFIXES):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        elif column.startswith(NULLABLE_INT_PREFIXES):
            frame[column] = frame[column].astype("Int64")
        elif frame[column].dtype == object:
            frame[column] = _one_missing(frame[column])
    return frame


def _one_missing(column: pd.Series) -> pd.Series:
    """Text columns as pandas' text dtype (missing: NaN), others with None for missing: one
    form whichever sweeps a frame was put together from."""
    import pandas as pd

    if pd.api.types.infer_dtype(column, skipna=True) == "string":
        return column.astype("str")
    return column.where(column.notna(), None)


# The frame index: per sweep, every record's row and the state of the file it came from.
FRAME_INDEX = Path("index") / "runs.arrow"
STATE = ("_path", "_ino", "_size", "_mtime_ns", "_ctime_ns")


def _frame_code() -> str:
    return code_hash("analysis.py", "record.py", "formatting.py", versions=("pandas", "pyarrow")).hex()


def _sweep_rows(root: Path, sweep: str) -> pd.DataFrame:
    """A sweep's rows (with STATE columns), from its frame index where the files did not change.

    As the checker's index (``harness.check.index``): a row is read again when its file's
    inode, size or times differ, or when it changed within RACY_NS of the index's writing; new
    files are read, removed ones dropped; an index that is missing, unreadable or from other
    code is rebuilt; it is rewritten atomically, and only when something changed.
    """
    import pandas as pd

    now = time.time_ns()
    files = ResultsStore(root)
    states = {rel: FileState.of(st) for rel, st in files.file_stats(sweep).items()}
    cached, written_ns = _read_frame_index(root / sweep / FRAME_INDEX)
    if cached is None:
        kept, todo = None, sorted(states)
    else:
        now_state = [(rel, st.ino, st.size, st.mtime_ns, st.ctime_ns) for rel, st in states.items()]
        current = (
            pd.DataFrame(now_state, columns=list(STATE)).set_index("_path").reindex(cached["_path"], fill_value=-1)
        )
        same = (current.to_numpy() == cached[list(STATE[1:])].to_numpy()).all(axis=1)
        valid = same & (cached["_ctime_ns"].to_numpy() < written_ns - RACY_NS)
        kept = cached[valid]
        todo = sorted(set(states) - set(kept["_path"]))
    rows = []
    for rel in todo:
        try:
            data, state = read_file(str(root / rel))
            record = decode_record(data)
        except (OSError, ValueError):
            continue  # not a record now (harness check names it); read again next time
        if record.run_id == Path(rel).stem:
            rows.append({**run_row(record), **dict(zip(STATE, (rel, *msgspec.structs.astuple(state)), strict=True))})
    parts = [f for f in (kept, pd.DataFrame(rows)) if f is not None and len(f)]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(STATE))
    if kept is not None and rows:  # the new rows in path order with the kept ones
        frame = frame.sort_values("_path", kind="stable", ignore_index=True)
    if kept is None or rows or len(kept) != len(cached):
        _write_frame_index(root / sweep / FRAME_INDEX, frame, now)
    return frame


def _read_frame_index(path: Path) -> tuple[Any, int]:
    """The cached rows and when their files' states were taken, or (None, 0)."""
    import pyarrow.feather as feather

    try:
        table = feather.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("harness.code") != _frame_code():
            return None, 0
        as_json = json.loads(meta["harness.json_columns"])
        decoded = {c: _from_json(table.column(c).to_pylist()) for c in as_json}
        frame = table.drop_columns(as_json).to_pandas()
        for column, values in decoded.items():
            frame[column] = _object_column(values)
        return frame[table.column_names], int(meta["harness.written_ns"])
    except (OSError, ValueError, KeyError):  # missing, damaged (pyarrow's errors are ValueErrors)
        return None, 0


def _write_frame_index(path: Path, frame: pd.DataFrame, written_ns: int) -> None:
    """Arrow IPC (LZ4), not Parquet: it reads 4x faster here. Object columns holding anything
    but text are stored as JSON text and read back as they were."""
    import pyarrow as pa
    import pyarrow.feather as feather

    flat = frame.copy()
    as_json = [c for c in flat.columns if flat[c].dtype == object and not _text_only(flat[c])]
    for column in as_json:
        flat[column] = [_to_json(v) for v in flat[column]]
    table = pa.Table.from_pandas(flat, preserve_index=False)
    meta = {"harness.code": _frame_code(), "harness.written_ns": str(written_ns)}
    meta["harness.json_columns"] = json.dumps(as_json)
    buffer = io.BytesIO()
    feather.write_feather(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), buffer)
    with contextlib.suppress(OSError):  # a read-only store is read without an index
        atomic_write_bytes(path, buffer.getvalue())


def _object_column(values: list[Any]) -> Any:
    """A column of Python values as pandas keeps them (an object array: lists stay lists)."""
    import numpy as np

    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _to_json(value: Any) -> str | None:
    """A cell as JSON text (NaN, where pandas marks a missing key, as the text ``NaN``)."""
    if value is None:
        return None
    return "NaN" if isinstance(value, float) and value != value else msgspec.json.encode(value).decode()


def _from_json(texts: list[str | None]) -> list[Any]:
    """Cells from ``_to_json``; each distinct text is decoded once, and equal cells share the
    value (a layer list in 100,000 rows is one list: copy a cell before changing it in place)."""
    values: dict[str | None, Any] = {None: None, "NaN": float("nan")}
    for text in set(texts) - set(values):
        values[text] = msgspec.json.decode(cast(str, text))
    return [values[t] for t in texts]


def _text_only(column: pd.Series) -> bool:
    return all(v is None or isinstance(v, str) for v in column)


def load_scores(
    results: Path | str,
    sweeps: Iterable[str] | None = None,
    roles: Iterable[str] | None = None,
    statuses: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Per-image scores in long form: ``run_id``, ``image_path``, ``label``, ``score`` (raw model
    scores, in each record's image order); runs without predictions have no rows."""
    import numpy as np
    import pandas as pd

    parts: dict[str, list[Any]] = {"run_id": [], "image_path": [], "label": [], "score": []}
    for record in records(results, sweeps, roles, statuses):
        p = record.predictions
        if p is None:
            continue
        parts["run_id"] += [record.run_id] * len(p.image_paths)
        parts["image_path"] += p.image_paths
        parts["label"] += p.labels
        parts["score"] += p.image_scores
    return pd.DataFrame(
        {
            "run_id": pd.Series(parts["run_id"], dtype="object"),
            "image_path": pd.Series(parts["image_path"], dtype="object"),
            "label": np.asarray(parts["label"], dtype="int8"),
            "score": np.asarray(parts["score"], dtype="float64"),
        }
    )


def check_frames(report: CheckReport) -> dict[str, pd.DataFrame]:
    """The checker's answer (``harness check --json``, docs/check-json.md) as DataFrames:

    - ``seed_stats``: per group and metric, the statistics over seeds and the group's
      determinism verdict;
    - ``determinism``: every same-seed, same-environment pair that is not bitwise;
    - ``cross_environment``: per group and pair of environments, how far the scores moved;
    - ``comparisons``: P(A better than B) per category and metric;
    - ``searches``: one row per HPO search and selected configuration.
    """

    doc = report.to_json()
    who = ("id", "label", "sweep", "model", "category", "role", "config_id")
    group_columns = ["group_id", "group_label", *who[2:]]
    stats, pairs, cross = [], [], []
    for g in doc["groups"]:
        group = {f"group_{k}" if k in ("id", "label") else k: g[k] for k in who}
        verdict = g["determinism"]["verdict"]
        for metric, stat in sorted(g["metrics"].items()):
            stats.append({**group, "n_runs": g["n_runs"], "metric": metric, **stat, "determinism": verdict})
        pairs += [{**group, **flatten(p, keep_empty=True)} for p in g["determinism"]["differing"]]
        cross += [{**group, **flatten(c, keep_empty=True)} for c in g["cross_environment"]]
    searches = [
        {**{k: v for k, v in s.items() if k != "selections"}, **flatten(sel, "selection.", keep_empty=True)}
        for s in doc["searches"]
        for sel in s.get("selections") or [{}]
    ]
    return {
        "seed_stats": _frame(stats, [*group_columns, "n_runs", "metric", *STAT_KEYS, "determinism"]),
        "determinism": _frame(pairs, [*group_columns, *PAIR_KEYS]),
        "cross_environment": _frame(cross, [*group_columns, *CROSS_KEYS]),
        "comparisons": _frame(doc["comparisons"], list(COMPARISON_KEYS)),
        "searches": _frame(searches, list(SEARCH_KEYS)),
    }


# The leading columns of the checker's frames (docs/analysis.md), there even when a frame has
# no rows; nested values follow them as dotted columns.
STAT_KEYS = ("n", "mean", "std", "ci_low", "ci_high", "min", "max", "cv", "mdd")
PAIR_KEYS = ("seed", "environment_a", "environment_b", "run_a", "run_b", "repeat_a", "repeat_b", "verdict")
CROSS_KEYS = ("environment_a", "environment_b", "variant_a", "variant_b", "same_machine", "seeds", "verdict")
COMPARISON_KEYS = ("category", "metric", "a", "b", "environment", "n_a", "n_b", "p_a_better", "ci_low", "ci_high")
SEARCH_KEYS = ("sweep", "model", "category", "environment", "variant", "n_trials", "n_ok", "n_failed")


def _frame(rows: list[dict[str, Any]], leading: list[str]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows)
    rest = [c for c in frame.columns if c not in leading]
    return frame.reindex(columns=[*leading, *rest])


def export_format(out: Path) -> str:
    """``parquet`` or ``csv``, by the file's suffix; anything else is an error."""
    if out.suffix not in (".parquet", ".csv"):
        raise HarnessError(f"--out {out}: name a .parquet or .csv file")
    return out.suffix[1:]


def export(frame: pd.DataFrame, out: Path) -> None:
    """Write ``frame`` to ``out`` (``.parquet`` through pyarrow, or ``.csv``), atomically.

    Cells that hold lists or mappings (a layer list, a validation curve) are written as JSON
    text, in both formats, and a column whose records hold values of several types as text:
    one column type per column, whatever the records hold.
    """
    kind = export_format(out)
    flat = frame.copy()
    for column in flat.columns:
        if flat[column].dtype == object:
            flat[column] = _one_type(flat[column])
    buffer = io.BytesIO()
    if kind == "parquet":
        flat.to_parquet(buffer, engine="pyarrow", index=False)
    else:
        flat.to_csv(buffer, index=False)
    atomic_write_bytes(out, buffer.getvalue())


def _one_type(column: pd.Series) -> pd.Series:
    out = column.map(lambda v: json.dumps(v) if isinstance(v, list | dict) else v)
    kinds = {type(v) for v in out if v is not None}
    return out.map(lambda v: None if v is None else str(v)) if len(kinds) > 1 else out
