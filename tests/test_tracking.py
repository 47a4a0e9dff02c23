"""W&B as a tracking sink: offline runs read back from their files, the key kept out of every
file, and a W&B failure that loses nothing."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness.check import check
from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.report import STABILITY_COLUMNS, StabilityReport
from harness.spec import WandbSpec, validate_spec
from harness.store import ResultsStore
from harness.tracking import WandbTracker, open_tracker, wandb_mode
from tests.recordkit import make_record, typed, write_records
from tests.test_sweep import SMOKE_HPO, records, sweep_cli, write_spec
from tests.wandbkit import OfflineRun, offline_runs

# Looks like a W&B key; never valid anywhere.
FAKE_KEY = "local-" + "f4e3d2c1b0" * 4


@pytest.fixture(autouse=True)
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """wandb's defaults for logs, caches and staging are under HOME: give it the test's own."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))  # wandb-core's default cache, if set
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


def tracker(results: Path, mode: str = "offline", sweep: str = "s1") -> WandbTracker:
    return WandbTracker("ad-test", None, mode, sweep, results, out=io.StringIO())


def trial_record(lr: float, curve: list[float], **kwargs: Any) -> dict[str, Any]:
    points = [{"epoch": i + 1, "val_image_AUROC": v, "val_pixel_AUROC": None} for i, v in enumerate(curve)]
    return make_record(
        model="ganomaly",
        study="hpo",
        role="trial",
        params={**make_record(model="ganomaly")["params"], "model_args": {"lr": lr, "max_epochs": 3}},
        metrics={"image_AUROC": None, "image_F1Max": None, "val_image_AUROC": curve[-1]},
        predictions=None,
        validation={
            "split": "synthetic",
            "ratio": 0.5,
            "n_val": 8,
            "n_val_anomalous": 4,
            "curve": points,
            "stopped_early": len(curve) < 3,
        },
        selection={"config": {"model_args.lr": lr}},
        **kwargs,
    )


def one_run(runs: dict[str, list[OfflineRun]], run_id: str) -> OfflineRun:
    (run,) = runs[run_id]
    return run


def test_each_stored_record_is_one_wandb_run_and_the_summary_run_holds_the_table(tmp_path: Path) -> None:
    study = [
        make_record(seed=s, repeat=r, metrics={"image_AUROC": 0.8 + s / 100}, fit_s=1.0 + s)
        for s in range(3)
        for r in range(2)
    ]
    failed = make_record(seed=3, status="failed")
    trials = [trial_record(0.001, [0.5, 0.6, 0.7]), trial_record(0.01, [0.4])]
    other = make_record(sweep="s2")  # another sweep: not this tracker's
    root = write_records(tmp_path / "results", [*study, failed, *trials, other])
    store = ResultsStore(root)

    t = tracker(root)
    t.finish(store)
    assert t.failure is None
    assert t.logged == 9
    runs = offline_runs(root / "s1" / "wandb")
    summary_id = f"summary-{stable_hash('s1', 12)}"
    assert set(runs) == {r["run_id"] for r in [*study, failed, *trials]} | {summary_id}
    assert not (root / "s2" / "wandb").exists()

    for rec in [*study, failed]:
        run = one_run(runs, rec["run_id"])
        assert (run.project, run.group, run.job_type) == ("ad-test", "s1", "patchcore")
        assert run.name == f"patchcore disc seed={rec['seed']} r{rec['repeat']}"  # as progress names it
        assert {"disc", f"seed{rec['seed']}", "run", "env-cpu-epyc-2t"} <= set(run.tags)
        assert run.config["seed"] == rec["seed"]
        assert run.config["repeat"] == rec["repeat"]
        assert run.config["model_args.coreset_sampling_ratio"] == 0.1
        assert run.config["data.image_size"] == 64
        assert run.config["environment.environment_id"] == "cpu-epyc-2t"
        assert run.summary["status"] == rec["status"]
        assert run.summary["memory.peak_rss_bytes"] == rec["memory"]["peak_rss_bytes"]
        assert run.summary["timing.total_s"] == rec["timing"]["total_s"]
        # The record itself rides along, byte for byte what the store holds.
        assert f"{rec['run_id']}.json" in run.files
        copy = run.dir / "files" / f"{rec['run_id']}.json"
        assert copy.read_bytes() == store.path("s1", rec["run_id"]).read_bytes()
    for rec in study:
        run = one_run(runs, rec["run_id"])
        assert run.exit_code == 0
        assert run.summary["image_AUROC"] == rec["metrics"]["image_AUROC"]
        assert run.summary["pixel_AUROC"] == rec["metrics"]["pixel_AUROC"]
        assert run.summary["timing.fit_s"] == rec["timing"]["fit_s"]
    run = one_run(runs, failed["run_id"])
    assert run.exit_code == 1
    assert "failed" in run.tags
    assert run.summary["error"] == failed["error"]
    assert "image_AUROC" not in run.summary

    # Trials: the validation curve epoch by epoch, the sampled value in the config.
    for rec in trials:
        run = one_run(runs, rec["run_id"])
        lr = rec["selection"]["config"]["model_args.lr"]
        assert run.name == f"ganomaly disc trial lr={lr:.3g}"
        assert run.config["model_args.lr"] == lr
        assert run.config["selection.config.model_args.lr"] == lr
        curve = rec["validation"]["curve"]
        assert [(h["_step"], h["val_image_AUROC"]) for h in run.history] == [
            (p["epoch"], p["val_image_AUROC"]) for p in curve
        ]
        assert all("val_pixel_AUROC" not in h for h in run.history)  # None is not logged
        assert run.summary["validation.stopped_early"] == (len(curve) < 3)

    # The summary run: the report's stability table, its plots, and the report as an artifact.
    summary = one_run(runs, summary_id)
    assert (summary.group, summary.job_type) == ("s1", "summary")
    table = summary.table("stability")
    expected = StabilityReport(check(root, sweep="s1"), "", "s1").stability_rows()
    assert table["columns"] == list(STABILITY_COLUMNS)
    assert table["data"] == [list(row) for _, row in expected]
    assert [row[:3] for row in table["data"]] == [["s1/patchcore", "disc", "3"]]
    assert table["data"][0][3] == "0.810 ± 0.010"
    numbers = {(r[2], r[3]): r for r in summary.table("seed_stats")["data"]}
    stat = numbers[("image_AUROC", 3)]
    assert stat[:2] == ["s1/patchcore", "disc"]
    assert stat[4:6] == [pytest.approx(0.81), pytest.approx(0.01)]  # mean and std over seeds 0.80, 0.81, 0.82
    plots = ["search-s1-ganomaly", "seeds-image_AUROC", "seeds-pixel_AUROC"]
    assert sorted(summary.artifacts["report-s1"]) == ["s1.md", *(f"s1/{p}.png" for p in plots)]
    assert {f"plots/{p}" for p in plots} <= set(summary.summary)
    assert isinstance(t.out, io.StringIO)
    assert "W&B (offline): 9 runs and the summary run" in t.out.getvalue()


def test_wandb_writes_nothing_outside_the_sweeps_wandb_folder(tmp_path: Path, wandb_home: Path) -> None:
    """wandb-core's debug log defaults to ~/.cache/wandb/logs and artifact staging to
    ~/.local/share/wandb: both stay in ``RESULTS/<sweep>/wandb`` (staging in the offline run's
    own folder, where ``wandb sync`` reads it)."""
    root = write_records(tmp_path / "results", [make_record(seed=s) for s in range(2)])
    t = tracker(root)
    t.finish(ResultsStore(root))
    assert t.failure is None
    assert [p for p in wandb_home.rglob("*") if "wandb" in p.name] == []
    folder = root / "s1" / "wandb"
    assert len(list(folder.glob("cache/wandb/logs/core-debug-*.log"))) == 1
    summary = one_run(offline_runs(folder), f"summary-{stable_hash('s1', 12)}")
    assert len(summary.staged) == 5  # the report, its two plots, the two tables
    assert all(p.is_file() and p.is_relative_to(summary.dir / "artifacts" / "staging") for p in summary.staged)


def test_a_run_that_fails_while_staging_leaves_no_staged_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk fills up while the summary run stages its artifact files: the copies wandb
    made (one whole, one cut short) go with the failed run."""
    root = write_records(tmp_path / "results", [make_record(seed=s) for s in range(2)])
    copyfile = shutil.copyfile
    staged: list[Path] = []

    def filling_disk(src: str, dst: str, **kwargs: Any) -> str:
        if Path(dst).parent.name != "staging":
            return copyfile(src, dst, **kwargs)
        staged.append(Path(dst))
        if len(staged) == 1:
            return copyfile(src, dst, **kwargs)
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", filling_disk)
    t = tracker(root)
    t.finish(ResultsStore(root))
    assert t.failure == "OSError: [Errno 28] No space left on device"
    assert "W&B: offline logging failed" in capsys.readouterr().err
    assert t.logged == 2
    assert len(staged) == 2
    left = [p for p in (root / "s1" / "wandb").rglob("*") if "staging" in p.parts and p.is_file()]
    assert left == []


def test_the_ledger_logs_each_record_once_and_again_when_it_changes(tmp_path: Path) -> None:
    recs = [make_record(seed=s) for s in range(2)]
    root = write_records(tmp_path / "results", recs)
    store = ResultsStore(root)
    tracker(root).finish(store, summary=False)

    again = tracker(root)
    again.finish(store, summary=False)
    assert again.logged == 0  # a resumed sweep does not log its stored runs twice
    rerun = make_record(seed=1, metrics={"image_AUROC": 0.7})  # the same run, stored anew
    assert rerun["run_id"] == recs[1]["run_id"]
    third = tracker(root)
    third.attach(store)
    store.put(typed(rerun))  # queued by the observer, logged by the tracker's thread
    third.finish(store, summary=False)
    assert third.logged == 1
    runs = offline_runs(root / "s1" / "wandb")
    assert len(runs[recs[0]["run_id"]]) == 1
    assert [r.summary["image_AUROC"] for r in runs[recs[1]["run_id"]]] == [0.9, 0.7]


@pytest.mark.parametrize(
    ("env", "spec", "key", "expected"),
    [
        (None, "offline", None, "offline"),
        (None, "disabled", None, "disabled"),
        ("disabled", "offline", None, "disabled"),
        ("offline", "online", None, "offline"),
        ("dryrun", "online", None, "offline"),
        (None, "online", FAKE_KEY, "online"),
        ("online", "offline", FAKE_KEY, "online"),
    ],
)
def test_wandb_mode_env_overrides_the_spec(
    env: str | None, spec: str, key: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("WANDB_MODE", env), ("WANDB_API_KEY", key)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert wandb_mode(WandbSpec(mode=spec)) == expected  # type: ignore[arg-type]


def test_online_without_a_key_and_unknown_modes_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(HarnessError, match="online needs WANDB_API_KEY in the environment"):
        wandb_mode(WandbSpec(mode="online"))
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(HarnessError, match="WANDB_MODE='sometimes': use offline, online or disabled"):
        wandb_mode(WandbSpec())
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "soon")
    with pytest.raises(HarnessError, match="WANDB_INIT_TIMEOUT='soon': a number of seconds > 0"):
        wandb_mode(WandbSpec())


@pytest.mark.parametrize("name", ["team/project", "my project", "a#b", ""])
def test_names_wandb_refuses_are_spec_errors(name: str) -> None:
    with pytest.raises(HarnessError, match=r"tracking\.wandb\.project"):
        validate_spec(
            {"model": "patchcore", "data": {"categories": ["disc"]}, "tracking": {"wandb": {"project": name}}}
        )


def test_a_sweep_without_records_gets_no_summary_run(tmp_path: Path) -> None:
    root = write_records(tmp_path / "results", [make_record(sweep="s2")])
    t = tracker(root)
    t.finish(ResultsStore(root))
    assert t.failure is None
    assert not (root / "s1" / "wandb").exists()


def test_no_tracking_section_or_disabled_means_no_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE")
    base = {"model": "patchcore", "data": {"categories": ["disc"]}}
    assert open_tracker(validate_spec(base), tmp_path) is None
    assert open_tracker(validate_spec({**base, "tracking": {"wandb": {"mode": "disabled"}}}), tmp_path) is None
    spec = validate_spec({**base, "tracking": {"wandb": {"project": "p", "entity": "team"}}})
    t = open_tracker(spec, tmp_path)
    assert t is not None
    assert (t.project, t.entity, t.mode, t.sweep) == ("p", "team", "offline", "adhoc")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert open_tracker(spec, tmp_path) is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the with ends: nothing answers there


def unreachable_server(monkeypatch: pytest.MonkeyPatch, timeout_s: float = 3) -> None:
    """Online mode with a key, against a W&B server that is not there (loopback, nothing listening)."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", str(timeout_s))


def test_a_wandb_failure_is_said_once_and_loses_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable_server(monkeypatch, timeout_s=8)
    store = ResultsStore(tmp_path / "results")
    t = tracker(store.root, mode="online")
    t.attach(store)
    recs = [make_record(seed=s) for s in range(3)]
    t0 = time.monotonic()
    paths = [store.put(typed(r)) for r in recs]  # queued: W&B works on the first while the driver goes on
    assert time.monotonic() - t0 < 4  # well inside the 8 s W&B waits for the server
    assert t.failure is None
    t.finish(store)
    err = capsys.readouterr().err
    assert err.count("W&B: online logging failed") == 1, err
    assert "Every record is stored" in err
    assert FAKE_KEY not in err
    assert t.failure is not None
    assert t.logged == 0
    assert [json.loads(p.read_text()) for p in paths] == recs
    assert not (store.root / "s1" / "wandb" / "logged").exists()  # so the next sweep logs them


def test_sweep_online_without_a_key_fails_before_ray_starts(
    tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    online = {"wandb": {"mode": "online"}}
    spec = write_spec(tmp_path / "s.yaml", SMOKE_HPO, data__root=str(synth_root), tracking=online)
    out = sweep_cli(spec, tmp_path / "results")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "harness sweep: error: W&B mode online needs WANDB_API_KEY in the environment (keys are never read from "
        "specs or files); or run offline and upload later with `wandb sync`"
    ]
    assert not (tmp_path / "results").exists()


def _files_with(text: str, *roots: Path) -> list[str]:
    hits = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if stat.S_ISREG(path.lstat().st_mode) and text.encode() in path.read_bytes():
                    hits.append(str(path))
    return hits


@pytest.mark.slow
def test_an_offline_sweep_logs_every_record_and_never_writes_the_key(
    tmp_path: Path, synth_root: Path, ray_tmp: Path, wandb_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # offline: the key is there, and must go nowhere
    spec = write_spec(
        tmp_path / "hpo.yaml",
        SMOKE_HPO,
        name="tracked",
        data__root=str(synth_root),
        num_samples=2,
        tracking={"wandb": {"project": "ad-test", "mode": "offline"}},
    )
    results = tmp_path / "results"
    out = sweep_cli(spec, results)
    assert out.returncode == 0, out.stderr
    recs = records(results)
    assert sorted(r["role"] for r in recs) == ["best", "best", "trial", "trial"]
    runs = offline_runs(results / "tracked" / "wandb")
    assert set(runs) == {r["run_id"] for r in recs} | {f"summary-{stable_hash('tracked', 12)}"}
    for rec in recs:
        run = one_run(runs, rec["run_id"])
        assert (run.project, run.group, run.job_type) == ("ad-test", "tracked", "ganomaly")
        assert run.config["model_args.lr"] == rec["params"]["model_args"]["lr"]
        assert run.config["role"] == rec["role"]
        metrics = {k: v for k, v in rec["metrics"].items() if v is not None}
        assert {k: run.summary[k] for k in metrics} == metrics
        assert run.summary["timing.total_s"] == rec["timing"]["total_s"]
        curve = (rec["validation"] or {}).get("curve", [])
        assert [h["_step"] for h in run.history] == [p["epoch"] for p in curve]
    summary = one_run(runs, f"summary-{stable_hash('tracked', 12)}")
    (row,) = summary.table("stability")["data"]
    assert row[:3] == ["tracked/ganomaly [best]", "disc", "2"]
    assert "W&B (offline): 4 runs and the summary run" in out.stdout
    assert "wandb sync" in out.stdout

    # The key is in the environment of the driver (and of the local cluster it started) and nowhere else.
    assert FAKE_KEY not in out.stdout + out.stderr
    assert _files_with(FAKE_KEY, results, wandb_home, ray_tmp) == []
    assert all(FAKE_KEY not in json.dumps(r.config) for rs in runs.values() for r in rs)


@pytest.mark.slow
def test_harness_run_survives_an_unreachable_wandb_server(
    tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable_server(monkeypatch)
    results = tmp_path / "results"
    out = subprocess.run(
        [
            *(sys.executable, "-m", "harness", "run", "--model", "patchcore", "--data-root", str(synth_root)),
            *("--category", "disc", "--results", str(results), "--set", "model_args.pre_trained=false"),
            *("--set", "data.image_size=64", "--set", "tracking.wandb.project=ad-test"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    (rec,) = records(results)
    assert rec["status"] == "ok"
    assert out.stderr.count("W&B: online logging failed") == 1, out.stderr
    assert FAKE_KEY not in out.stdout + out.stderr
    assert "patchcore disc seed=0 r0: image_AUROC=" in out.stdout


def test_a_store_with_a_tracker_pickles_without_it(tmp_path: Path) -> None:
    """Ray Tune pickles its callbacks, which hold the store: the tracker's thread must not go along."""
    store = ResultsStore(tmp_path)
    tracker(tmp_path).attach(store)
    copy = pickle.loads(pickle.dumps(store))
    assert (copy.root, copy.observers) == (tmp_path, [])
    assert len(store.observers) == 1
