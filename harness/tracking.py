"""W&B, a tracking sink at the edge: it receives records after they are stored, decides nothing.

Every stored record becomes one W&B run whose id is the record's run id, so logging a record
again continues that run instead of adding one. A sweep ends with a summary run holding the
stability table and the report. Only the sweep's driver talks to W&B: workers never use the
API key and drop it from their environment.

A W&B failure (bad key, no network) is reported once and turns W&B off for the rest of the
command; records are stored first, so nothing is lost. A ledger
(``RESULTS/<sweep>/wandb/logged/<run_id>``) says which records went up, so the next sweep of
the same spec logs whatever a failure, a kill or an untracked earlier sweep left out.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from harness.errors import HarnessError
from harness.formatting import flatten, run_name
from harness.fsutil import atomic_write_bytes
from harness.hashing import stable_hash
from harness.record import RunRecord
from harness.spec import ExperimentSpec, WandbSpec
from harness.store import ResultsStore

MODES = ("offline", "online", "disabled")
KEY_ENV = "WANDB_API_KEY"
# wandb waits 90 s for an unreachable server by default, and for pending uploads forever.
INIT_TIMEOUT_S = 30.0
FINISH_TIMEOUT_S = 300.0
# The summary run's numeric table: one row per group and metric (what W&B can sort and plot).
SEED_STATS_COLUMNS = ("model", "category", "metric", "n", "mean", "std", "ci_low", "ci_high", "min", "max", "cv", "mdd")


def wandb_mode(spec: WandbSpec) -> str:
    """The spec's mode, unless ``WANDB_MODE`` says otherwise; online needs a key in the environment."""
    mode = os.environ.get("WANDB_MODE", "").strip() or spec.mode
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's older names
    if mode not in MODES:
        raise HarnessError(f"WANDB_MODE={mode!r}: use offline, online or disabled")
    for name, default in (("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S), ("WANDB_FINISH_TIMEOUT", FINISH_TIMEOUT_S)):
        _seconds(name, default)
    if mode == "online" and not os.environ.get(KEY_ENV):
        raise HarnessError(
            f"W&B mode online needs {KEY_ENV} in the environment (keys are never read from specs or files); "
            "or run offline and upload later with `wandb sync`"
        )
    return mode


def open_tracker(spec: ExperimentSpec, results: Path, out: TextIO = sys.stdout) -> WandbTracker | None:
    """The spec's W&B sink, or None when it has no ``tracking.wandb`` or its mode is disabled."""
    if spec.tracking.wandb is None:
        return None
    mode = wandb_mode(spec.tracking.wandb)
    if mode == "disabled":
        return None
    return WandbTracker(spec.tracking.wandb.project, spec.tracking.wandb.entity, mode, spec.name, results, out)


def run_config(record: RunRecord) -> dict[str, Any]:
    """What defines the run, one level deep: the W&B filters and parallel coordinates read it."""
    identity = ("sweep", "study", "model", "category", "seed", "repeat", "role")
    config: dict[str, Any] = {k: getattr(record, k) for k in identity}
    config["data.root"] = record.data.root
    config.update(flatten(record.params))
    config.update(flatten(record.selection or {}, "selection."))
    config.update(flatten(record.environment, "environment."))
    return config


def run_summary(record: RunRecord) -> dict[str, Any]:
    """Metrics, timing and memory, as W&B's run table and charts show them."""
    summary: dict[str, Any] = {k: v for k, v in record.metrics.items() if v is not None}
    summary["status"] = record.status
    if record.error:
        summary["error"] = record.first_error_line()
    doc = record.to_builtins()
    parts = {"timing": doc["timing"], "memory": doc["memory"]}
    parts["data"] = {k: doc["data"][k] for k in ("n_train", "n_test")}
    if doc.get("validation"):
        parts["validation"] = {k: v for k, v in doc["validation"].items() if k != "curve"}
    summary.update({k: v for k, v in flatten(parts).items() if v is not None})
    return summary


def run_tags(record: RunRecord) -> list[str]:
    tags = [record.category, f"seed{record.seed}", record.role]
    tags += [f"env-{record.environment_id}"] if record.environment_id else []
    variant = record.environment.get("variant")
    tags += [f"variant-{variant}"] if variant else []
    tags += ["failed"] if not record.ok else []
    return [t[:64] for t in tags]  # W&B's limit


def sweep_wandb_dir(results: Path, sweep: str) -> Path:
    """Where a sweep's W&B runs, wandb's own logs and the ledger live: beside its records."""
    return results / sweep / "wandb"


@dataclass
class WandbTracker:
    """Logs one sweep's stored records to W&B; see the module docstring for what it promises.

    Records are logged by a thread of their own, so a slow or unreachable server never holds
    up the driver, which goes on scheduling runs while a record uploads.
    """

    project: str
    entity: str | None
    mode: str
    sweep: str
    results: Path
    out: TextIO = sys.stdout
    logged: int = 0
    failure: str | None = None
    _queue: queue.Queue[tuple[RunRecord, Path] | None] = field(default_factory=queue.Queue, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def dir(self) -> Path:
        return sweep_wandb_dir(self.results, self.sweep)

    def attach(self, store: ResultsStore) -> None:
        store.observers.append(self.log)

    def log(self, record: RunRecord, path: Path) -> None:
        """Queue one stored record for W&B (a store observer: it returns at once)."""
        if self.failure is None and record.sweep == self.sweep:
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="wandb-tracker", daemon=True)
                self._thread.start()
            self._queue.put((record, path))

    def finish(self, store: ResultsStore, summary: bool = True) -> None:
        """Wait for the queued records, log the stored ones not logged yet, then (for a sweep)
        the summary run."""
        self._stop()
        stored = list(store.paths(self.sweep))
        missing = [p for p in stored if not self._logged(p)]
        if missing and self.failure is None:
            print(f"W&B: logging {len(missing)} stored runs that are not in W&B yet", file=self.out, flush=True)
        for path in missing:
            record = store.get(self.sweep, path.stem) if self.failure is None else None
            if record is not None:
                self._guard(self._log_run, record, path)
        url = self._guard(self._log_summary) if summary and stored and self.failure is None else None
        self.close()
        if self.failure is not None:
            return
        done = f"{self.logged} runs" + (" and the summary run" if summary else "")
        where = f"{self.dir}; upload with: wandb sync {self.dir}/offline-run-*"
        if self.mode == "online":
            where = url or f"project {self.project}"
        print(f"W&B ({self.mode}): {done} of project {self.project}, group {self.sweep}: {where}", file=self.out)

    def close(self) -> None:
        """Stop the logging thread and wandb's service process (also after an interrupted sweep:
        a record still uploading gets a few seconds, then the ledger has it logged next time)."""
        self._stop(timeout=10.0)
        wandb = sys.modules.get("wandb")
        if wandb is not None:
            self._guard(wandb.teardown)

    # --- internals ---

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.failure is None:
                self._guard(self._log_run, *item)

    def _stop(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _ledger(self, run_id: str) -> Path:
        return self.dir / "logged" / run_id

    def _logged(self, path: Path) -> bool:
        """Logged after the record file was last written (a rerun's new record is logged anew)."""
        try:
            return self._ledger(path.stem).stat().st_mtime_ns >= path.stat().st_mtime_ns
        except OSError:
            return False

    def _guard(self, fn: Any, *args: Any) -> Any:
        """Run one W&B step; the first failure is said once and ends W&B for this command."""
        try:
            return fn(*args)
        except Exception as exc:  # wandb raises many types; none of them may stop a sweep
            if self.failure is not None:
                return None
            first = (str(exc).strip().splitlines() or [""])[0]
            self.failure = _redact(f"{type(exc).__name__}: {first}")
            print(
                f"W&B: {self.mode} logging failed ({self.failure}). Every record is stored; W&B is off for the "
                "rest of this command; the next sweep (or run) of this spec logs what is missing.",
                file=sys.stderr,
                flush=True,
            )
            return None

    def _init(self, **kwargs: Any) -> Any:
        import wandb

        settings = wandb.Settings(
            silent=True,
            console="off",
            x_disable_stats=True,
            x_disable_meta=True,  # the record's environment is in the config already
            disable_git=True,
            save_code=False,
            x_save_requirements=False,
            init_timeout=_seconds("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S),
            # Uploads still pending after this are given up (and said), not waited on forever.
            finish_timeout=_seconds("WANDB_FINISH_TIMEOUT", FINISH_TIMEOUT_S),
            finish_timeout_raises=True,
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        resume = "allow" if self.mode == "online" else None  # offline runs never resume
        return wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,  # type: ignore[arg-type]
            dir=str(self.dir.parent),  # wandb adds the "wandb/" itself
            group=self.sweep,
            resume=resume,  # type: ignore[arg-type]
            settings=settings,
            **kwargs,
        )

    @contextlib.contextmanager
    def _run(self, exit_code: int = 0, **kwargs: Any) -> Iterator[Any]:
        """One W&B run, from init to finish, with wandb's files in the sweep's ``wandb/``.

        wandb-core writes its log (online, also a copy of each uploaded artifact file) under
        ``WANDB_CACHE_DIR``, ``~/.cache/wandb`` by default. wandb stages artifact files in
        ``WANDB_DATA_DIR/artifacts/staging`` and never removes a failed run's: here each run
        stages in its own folder, which an offline run keeps for ``wandb sync`` and any other
        run empties when it ends.
        """
        with _env_default("WANDB_CACHE_DIR", str(self.dir / "cache")):
            run = self._init(**kwargs)
            folder = Path(run.dir).parent
            keep = False
            try:
                with _env_default("WANDB_DATA_DIR", str(folder)):
                    try:
                        yield run
                    finally:
                        run.finish(exit_code=exit_code)
                keep = self.mode == "offline"
            finally:
                if not keep:
                    shutil.rmtree(folder / "artifacts", ignore_errors=True)

    def _log_run(self, record: RunRecord, path: Path) -> None:
        with self._run(
            exit_code=0 if record.ok else 1,
            id=record.run_id,
            job_type=record.model,
            name=run_name(record),
            config=run_config(record),
            tags=run_tags(record),
        ) as run:
            # An HPO trial's validation curve, epoch by epoch, as Tune saw it.
            for point in record.validation.curve if record.validation else []:
                run.log(
                    {k: v for k, v in point.items() if k != "epoch" and v is not None}, step=int(point["epoch"] or 0)
                )
            run.summary.update(run_summary(record))
            copy = Path(run.dir) / path.name  # a copy in the run's files: later writes cannot change it
            shutil.copyfile(path, copy)
            run.save(str(copy), base_path=run.dir, policy="now")
        atomic_write_bytes(self._ledger(record.run_id), b"")  # its mtime is what counts
        self.logged += 1

    def _log_summary(self) -> str | None:
        """The stability table, the plots and the report (md + PNGs, as an artifact) of the sweep."""
        import wandb

        from harness.check import check
        from harness.report import STABILITY_COLUMNS, StabilityReport, report_command, write_report

        try:
            rep = check(self.results, sweep=self.sweep)
        except HarnessError as exc:  # no readable record: nothing to summarise, and no W&B failure
            print(f"W&B: no summary run ({exc})", file=self.out)
            return None
        command = report_command(self.results, self.sweep)
        rows = [list(row) for _, row in StabilityReport(rep, command, self.sweep).stability_rows()]
        numbers = [
            [g.label, g.category, metric, *stat.to_json().values()]
            for g in rep.groups
            for metric, stat in sorted(g.stats.items())
        ]
        with (
            self._run(
                id=f"summary-{stable_hash(self.sweep, 12)}",
                job_type="summary",
                name=f"{self.sweep}/summary",
                config={"sweep": self.sweep, "records": rep.store.n_files, "report_command": command},
                tags=["summary"],
            ) as run,
            tempfile.TemporaryDirectory() as tmp,
        ):
            md, plots = write_report(rep, Path(tmp) / f"{self.sweep}.md", command)
            artifact = wandb.Artifact(f"report-{self.sweep}", type="report", description=f"built by `{command}`")
            artifact.add_file(str(md), name=md.name)
            for p in plots:
                artifact.add_file(str(p), name=f"{md.stem}/{p.name}")
            run.log(
                {
                    "stability": wandb.Table(columns=list(STABILITY_COLUMNS), data=rows),
                    "seed_stats": wandb.Table(columns=list(SEED_STATS_COLUMNS), data=numbers),
                    **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots},
                }
            )
            run.log_artifact(artifact)
            return str(run.url) if self.mode == "online" else None


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """``name=value`` for the block unless the user set it; this process's environment after."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _seconds(name: str, default: float) -> float:
    """A timeout from the environment; checked when the tracker opens, not after a run."""
    value = os.environ.get(name, "").strip()
    try:
        seconds = float(value) if value else default
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise HarnessError(f"{name}={value!r}: a number of seconds > 0")
    return seconds


def _redact(text: str) -> str:
    """A key must never reach a log, even inside an error message."""
    key = os.environ.get(KEY_ENV)
    return text.replace(key, "***") if key else text
