"""The run record: one JSON file per run, the only thing the checker and report read.

One schema, used to write a record (the run, the sweep, the store) and to read it back (the
checker, tracking, a resumed search). msgspec, not pydantic: the checker decodes 100,000 of
them, and msgspec decodes and validates a whole record 5-7x faster than pydantic's
``json.loads`` + ``model_validate`` here (docs/performance.md).

Scores are the model's raw scores (no min-max normalisation), per test image in the order of
``image_paths`` (sorted, relative to the category), so two records compare element by
element and their hashes compare bit for bit. Records are frozen: a record that changes on
its way to the store (its Ray node, a trial stopped early) is a new one, made with
``msgspec.structs.replace``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec

RECORD_SCHEMA = "harness.run/1"
Role = Literal["run", "trial", "best"]  # a study's run, an HPO trial, a best-config run
Status = Literal["ok", "failed"]
# The quality metrics a run reports (an adaptive seed study targets one of them).
QUALITY = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "image_F1Max")
# Environment settings torch reads when it loads, by the variable a worker is started with
# (an environment's ``requested`` settings name them by the key on the left).
LOAD_TIME_SETTINGS = {"aten_cpu_capability": "ATEN_CPU_CAPABILITY", "onednn_max_isa": "DNNL_MAX_CPU_ISA"}


def load_time_env(requested: dict[str, Any]) -> dict[str, str]:
    """The variables a process must start with to honour ``requested``."""
    return {var: str(requested[key]) for key, var in LOAD_TIME_SETTINGS.items() if requested.get(key) is not None}


class _Part(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A block of a record: its fields are exactly these."""


class Predictions(_Part, frozen=True):
    image_paths: list[str]
    labels: list[int]
    image_scores: list[float]
    scores_sha256: str
    maps_sha256: str | None  # None for models without an anomaly map (GANomaly)
    model_sha256: str  # trained weights and buffers: where two runs first part ways


class SeedsPlan(_Part, frozen=True):
    """An adaptive seed study's rounds (spec ``seeds: {adaptive: ...}``): seeds 0, 1, 2, ...
    added ``round`` at a time from ``min`` until the CI half-width of ``metric``'s mean over
    seeds is at most ``ci_halfwidth``, or ``max`` seeds ran."""

    metric: str
    ci_halfwidth: float
    min: int
    max: int
    round: int


class Timing(_Part, frozen=True):
    """Seconds; fit and test are None for a run that failed before it got there."""

    fit_s: float | None
    test_s: float | None
    latency_ms_per_image: float | None  # test_s / test images, data loading included
    total_s: float


class Memory(_Part, frozen=True):
    peak_rss_bytes: int  # highest RSS sampled during the run
    process_peak_rss_bytes: int  # the process's lifetime peak (getrusage), imports included
    peak_gpu_bytes: int | None


class DataInfo(_Part, frozen=True):
    root: str
    sha256: str | None  # of every image and mask of the category; None if it could not be read
    n_train: int | None  # as anomalib's datamodule split them; None if the run failed first
    n_test: int | None


class ValidationInfo(_Part, frozen=True):
    """How an HPO trial was scored: never on the test split."""

    split: str  # "synthetic": held-out train images, part with anomalib's synthetic anomalies
    ratio: float  # share of the training images held out
    n_val: int
    n_val_anomalous: int
    curve: list[dict[str, int | float | None]]  # the validation metrics after each epoch
    stopped_early: bool = False  # the scheduler (ASHA) ended the trial before its last epoch


class RunRecord(_Part, frozen=True):
    """One run, ``ok`` or ``failed``; failed runs keep their error and what was measured."""

    run_id: str
    sweep: str
    study: str
    model: str
    params: dict[str, Any]
    category: str
    seed: int
    repeat: int
    status: Status
    error: str | None
    metrics: dict[str, float | None]
    predictions: Predictions | None
    timing: Timing
    memory: Memory
    data: DataInfo
    environment: dict[str, Any]
    started_at: str
    finished_at: str
    schema: str = RECORD_SCHEMA
    role: Role = "run"
    node_id: str | None = None  # the Ray node that ran it (None outside Ray)
    validation: ValidationInfo | None = None  # trials: metrics are validation metrics (val_*)
    selection: dict[str, Any] | None = None  # best-config runs: which trial won, on what
    # Seed studies with a fixed backbone: the training features' key, and whether this run
    # reused them from an earlier run of the study (it then trained on one batch only).
    features: dict[str, Any] | None = None
    # Each named random stream's seed (harness/streams.py); pinned ones are in params.streams.
    streams: dict[str, int] | None = None
    seeds_plan: SeedsPlan | None = None  # runs of an adaptive seed study: its rounds

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def environment_id(self) -> str | None:
        """The execution environment's id (records before environments had ``hardware_id``)."""
        value = self.environment.get("environment_id", self.environment.get("hardware_id"))
        return value if isinstance(value, str) else None

    @property
    def variant(self) -> str | None:
        """The study's name for the environment it ran in (None: it named none)."""
        value = self.environment.get("variant")
        return value if isinstance(value, str) else None

    @property
    def machine_id(self) -> str | None:
        value = self.environment.get("machine_id")
        return value if isinstance(value, str) else None

    @property
    def config(self) -> dict[str, Any]:
        """A trial's sampled values (empty for other runs)."""
        return dict((self.selection or {}).get("config") or {})

    def first_error_line(self) -> str:
        return (self.error or "").strip().splitlines()[0] if (self.error or "").strip() else ""

    def to_builtins(self) -> dict[str, Any]:
        """Plain dicts and lists, for what only takes those (Ray Tune's results, W&B)."""
        return msgspec.to_builtins(self)

    @classmethod
    def from_builtins(cls, doc: dict[str, Any]) -> RunRecord:
        return msgspec.convert(doc, cls)


_ENCODER = msgspec.json.Encoder(order="sorted")
_DECODER = msgspec.json.Decoder(RunRecord)


def encode_record(record: RunRecord) -> bytes:
    """A record's file content: sorted keys, indented, a trailing newline; equal records are
    equal bytes.

    JSON has no NaN (msgspec would write null, which a score cannot be): a record with one is
    refused before anything is written. Undefined metrics are None, never NaN.
    """
    scores = record.predictions.image_scores if record.predictions else []
    for name, values in (("image_scores", scores), ("metrics", record.metrics.values())):
        if not all(math.isfinite(v) for v in values if v is not None):
            raise ValueError(f"run {record.run_id}: {name} holds a value that is not a finite number")
    return msgspec.json.format(_ENCODER.encode(record), indent=2) + b"\n"


def decode_record(data: bytes) -> RunRecord:
    """A record file back; ``msgspec.ValidationError`` or ``DecodeError`` (both ValueErrors,
    one line each) for anything that is not one."""
    record = _DECODER.decode(data)
    if record.schema != RECORD_SCHEMA:
        raise ValueError(f"unknown schema {record.schema!r} (expected {RECORD_SCHEMA!r})")
    return record
