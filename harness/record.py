"""The run record: one JSON file per run, the only thing the checker and report read.

Field names follow DESIGN.md. Scores are the model's raw scores (no min-max normalisation),
per test image in the order of ``image_paths`` (sorted, relative to the category), so two
records compare element by element and their hashes compare bit for bit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

RECORD_SCHEMA = "harness.run/1"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Predictions(_Record):
    image_paths: list[str]
    labels: list[int]
    image_scores: list[float]
    scores_sha256: str
    maps_sha256: str | None  # None for models without an anomaly map (GANomaly)
    model_sha256: str  # trained weights and buffers: where two runs first part ways


class Timing(_Record):
    """Seconds; fit and test are None for a run that failed before it got there."""

    fit_s: float | None
    test_s: float | None
    latency_ms_per_image: float | None  # test_s / test images, data loading included
    total_s: float


class Memory(_Record):
    peak_rss_bytes: int  # highest RSS sampled during the run
    process_peak_rss_bytes: int  # the process's lifetime peak (getrusage), imports included
    peak_gpu_bytes: int | None


class DataInfo(_Record):
    root: str
    sha256: str | None  # of every image and mask of the category; None if it could not be read
    n_train: int | None  # as anomalib's datamodule split them; None if the run failed first
    n_test: int | None


class ValidationInfo(_Record):
    """How an HPO trial was scored: never on the test split."""

    split: str  # "synthetic": held-out train images, part with anomalib's synthetic anomalies
    ratio: float  # share of the training images held out
    n_val: int
    n_val_anomalous: int
    curve: list[dict[str, int | float | None]]  # the validation metrics after each epoch
    stopped_early: bool = False  # the scheduler (ASHA) ended the trial before its last epoch


class RunRecord(_Record):
    """One run, ``ok`` or ``failed``; failed runs keep their error and what was measured."""

    schema_: str = RECORD_SCHEMA
    run_id: str
    sweep: str
    study: str
    model: str
    params: dict[str, Any]
    category: str
    seed: int
    repeat: int
    status: Literal["ok", "failed"]
    error: str | None
    metrics: dict[str, float | None]
    predictions: Predictions | None
    timing: Timing
    memory: Memory
    data: DataInfo
    environment: dict[str, Any]
    started_at: str
    finished_at: str
    role: Literal["run", "trial", "best"] = "run"
    node_id: str | None = None  # the Ray node that ran it (None outside Ray)
    validation: ValidationInfo | None = None  # trials: metrics are validation metrics (val_*)
    selection: dict[str, Any] | None = None  # best-config runs: which trial won, on what
    # Seed studies with a fixed backbone: the training features' key, and whether this run
    # reused them from an earlier run of the study (it then trained on one batch only).
    features: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunRecord:
        """A stored record back (the inverse of ``to_json``)."""
        fields = {k: v for k, v in doc.items() if k != "schema"}
        return cls.model_validate({**fields, "schema_": doc.get("schema")})

    def to_json(self) -> dict[str, Any]:
        doc = self.model_dump(mode="json", exclude={"schema_"})
        return {"schema": self.schema_, **doc}
