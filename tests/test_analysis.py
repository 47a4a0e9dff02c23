"""Results as DataFrames: every field of a record in its row, per-image scores in long form,
the checker's answer as frames with the numbers `harness check --json` prints, and export."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from harness.analysis import check_frames, load_runs, load_scores
from harness.check.groups import check
from harness.formatting import flatten
from tests.recordkit import VALIDATION, make_record, write_records

REPO = Path(__file__).resolve().parent.parent


def store(root: Path) -> list[dict[str, Any]]:
    """Two categories x 3 seeds x 2 repeats, a failed run, and an HPO search's trials and best runs."""
    recs = [make_record(category=c, seed=s, repeat=r) for c in ("disc", "weave") for s in range(3) for r in range(2)]
    recs.append(make_record(seed=9, status="failed", error="RuntimeError: boom", metrics={}, predictions=None))
    for i, val in enumerate((0.6, 0.7)):
        trial = make_record(model="ganomaly", sweep="hpo", repeat=i, role="trial", study="hpo")
        curve = [{"epoch": 1, "val_image_AUROC": 0.5}, {"epoch": 2, "val_image_AUROC": val}]
        trial.update(metrics={"val_image_AUROC": val}, predictions=None, validation={**VALIDATION, "curve": curve})
        recs.append(trial)
    selection = {"metric": "val_image_AUROC", "mode": "max", "value": 0.7, "trial_run_id": recs[-1]["run_id"]}
    selection |= {"config": {"model_args.lr": 0.001}, "rule": "max of last-epoch val_image_AUROC"}
    recs += [
        make_record(model="ganomaly", sweep="hpo", seed=s, role="best", study="hpo", selection=selection)
        for s in range(3)
    ]
    write_records(root, recs)
    return recs


def same(a: Any, b: Any) -> bool:
    if isinstance(b, float) and math.isnan(b):
        return a is None or (isinstance(a, float) and math.isnan(a))
    if b is None or b is pd.NA:
        return a is None
    return bool(a == b)


def test_every_field_of_a_record_is_in_its_row(tmp_path: Path) -> None:
    recs = store(tmp_path)
    frame = load_runs(tmp_path)
    assert len(frame) == len(recs)
    assert frame["run_id"].is_unique
    rows = frame.set_index("run_id", drop=False)
    for rec in recs:
        row = rows.loc[rec["run_id"]]
        fields = flatten(rec, keep_empty=True)
        arrays = {
            k for k in fields if k in ("predictions.image_paths", "predictions.labels", "predictions.image_scores")
        }
        assert len(fields) - len(arrays) > 40
        for key, value in fields.items():
            if key in arrays:
                assert key not in frame.columns  # per-image arrays: load_scores
                continue
            assert same(value, row[key]), (key, value, row[key])
    assert set(frame["role"]) == {"run", "trial", "best"}
    failed = rows.loc[recs[12]["run_id"]]
    assert (failed["status"], failed["error"]) == ("failed", "RuntimeError: boom")
    trial = rows.loc[recs[13]["run_id"]]
    assert trial["validation.curve"][1]["val_image_AUROC"] == 0.6
    assert trial["metrics.val_image_AUROC"] == 0.6


def test_columns_have_their_documented_dtypes(tmp_path: Path) -> None:
    store(tmp_path)
    frame = load_runs(tmp_path)
    assert list(frame.columns[:10]) == [
        "run_id",
        "sweep",
        "study",
        "model",
        "category",
        "seed",
        "repeat",
        "role",
        "status",
        "error",
    ]
    assert frame["seed"].dtype == "int64"
    assert all(frame[c].dtype == "float64" for c in frame.columns if c.startswith(("metrics.", "timing.")))
    assert frame["memory.peak_rss_bytes"].dtype == "Int64"
    assert math.isnan(frame.loc[frame["status"] == "failed", "metrics.image_AUROC"].item())


def test_filters_and_a_misspelt_sweep(tmp_path: Path) -> None:
    store(tmp_path)
    assert set(load_runs(tmp_path, roles=["trial"])["role"]) == {"trial"}
    assert len(load_runs(tmp_path, sweeps=["hpo"], statuses=["ok"])) == 5
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match=r"no sweep 'hp0' in .* \(sweeps there: hpo, s1\)"):
        load_runs(tmp_path, sweeps=["hp0"])


def test_scores_in_long_form_are_each_records_scores(tmp_path: Path) -> None:
    recs = store(tmp_path)
    scores = load_scores(tmp_path, roles=["run"])
    with_predictions = [r for r in recs if r["role"] == "run" and r["predictions"]]
    assert len(scores) == sum(len(r["predictions"]["image_scores"]) for r in with_predictions)
    one = with_predictions[3]
    mine = scores[scores["run_id"] == one["run_id"]]
    assert mine["score"].tolist() == one["predictions"]["image_scores"]
    assert mine["label"].tolist() == one["predictions"]["labels"]
    assert mine["image_path"].tolist() == one["predictions"]["image_paths"]


def test_check_frames_hold_the_numbers_check_prints(tmp_path: Path) -> None:
    store(tmp_path)
    doc = json.loads(
        subprocess.run(
            [sys.executable, "-m", "harness", "check", str(tmp_path), "--json"], capture_output=True, text=True
        ).stdout
    )
    frames = check_frames(check(tmp_path))
    stats = frames["seed_stats"].set_index(["group_id", "metric"])
    for group in doc["groups"]:
        for metric, stat in group["metrics"].items():
            row = stats.loc[(group["id"], metric)]
            assert all(same(v, row[k]) for k, v in stat.items()), (group["label"], metric)
            assert row["determinism"] == group["determinism"]["verdict"]
    searches = frames["searches"]
    assert searches[["n_trials", "n_ok"]].values.tolist() == [[2, 2]]
    assert searches["selection.trial_run_id"].item() == doc["searches"][0]["selections"][0]["trial_run_id"]
    assert list(frames["comparisons"].columns[:4]) == ["category", "metric", "a", "b"]  # no rows: still its columns
    assert "max_score_diff" not in frames["determinism"] or frames["determinism"].empty


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_export_writes_the_same_table(tmp_path: Path, suffix: str) -> None:
    store(tmp_path / "results")
    out = tmp_path / f"runs{suffix}"
    done = subprocess.run(
        [sys.executable, "-m", "harness", "export", str(tmp_path / "results"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    frame = load_runs(tmp_path / "results")
    back = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out)
    assert list(back.columns) == list(frame.columns)
    assert f"({len(frame)} rows, {len(frame.columns)} columns)" in done.stdout
    assert back["metrics.image_AUROC"].tolist() == pytest.approx(frame["metrics.image_AUROC"].tolist(), nan_ok=True)
    curve = back.set_index("run_id")["validation.curve"].dropna()
    assert json.loads(curve.iloc[0])[0]["epoch"] == 1  # nested values as JSON text


def test_export_refuses_another_format_before_reading(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "harness", "export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.xlsx")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"harness export: error: --out {tmp_path / 'x.xlsx'}: name a .parquet or .csv file"


def run_notebook(results: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """notebooks/analysis.ipynb executed headless on ``results``: any error in a cell fails."""
    import nbclient
    import nbformat

    monkeypatch.setenv("HARNESS_RESULTS", str(results))
    notebook = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), "commit the notebook without outputs"
    return nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    ).execute()


def test_the_analysis_notebook_runs_on_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store(tmp_path)
    done = run_notebook(tmp_path, monkeypatch)
    text = "".join(o.get("text", "") for cell in done.cells for o in cell.get("outputs", []))
    assert "groups: pandas and the checker agree" in text
    outputs = [o for cell in done.cells for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the seed-spread plot was drawn
