"""One run: seed, build the anomalib model and datamodule, fit, predict, measure, record.

The same function serves ``harness run`` and every sweep worker. Bad input (data, weights,
device) raises ``HarnessError`` before anything trains, and nothing is stored for it; a
failure during training or testing becomes a ``failed`` record with its error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from harness.datasets import DataCheck, build_datamodule, check_data
from harness.errors import HarnessError
from harness.evaluate import Predicted, collect, compute_metrics
from harness.fingerprint import fingerprint
from harness.hashing import sha256_file, stable_hash, state_sha256
from harness.models import ModelArgs, get_model
from harness.record import DataInfo, Memory, Predictions, RunRecord, Timing
from harness.spec import RunSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda:0"
    if requested == "cuda":
        raise HarnessError("--device cuda: no CUDA device is visible to this process")
    return "cpu"


def seed_everything(seed: int, deterministic: bool, threads: int) -> None:
    """Seed every RNG a run draws from and set the determinism switches.

    anomalib's coreset draws its start index from torch and its random projection from
    numpy's global RNG; the thread count changes float reduction order, so it is fixed too.
    """
    import torch

    if deterministic:
        # cuBLAS needs this before its first call to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ["PL_GLOBAL_SEED"] = str(seed)  # what Lightning hands to dataloader workers
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads)


class MemoryMonitor:
    """Peak RSS sampled in a thread during the run (a reused worker's lifetime peak would lie)."""

    def __init__(self, device: str, interval_s: float = 0.02) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while True:
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> MemoryMonitor:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> Memory:
        peak_gpu = None
        if self.device.startswith("cuda"):
            import torch

            peak_gpu = int(torch.cuda.max_memory_allocated(self.device))
        return Memory(
            peak_rss_bytes=self.peak_rss,
            process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            peak_gpu_bytes=peak_gpu,
        )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep Lightning's banners, tips and progress bars out of the CLI's one-line output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Lightning's packages set their loggers' levels when imported: import them first.
        import anomalib.engine  # noqa: F401

    names = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning", "anomalib")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", module=r"lightning\.")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def make_run_id(spec: RunSpec, hardware_id: str) -> str:
    """Stable over reruns of the same run on the same hardware: the store's resume key."""
    return stable_hash({**spec.key(), "hardware_id": hardware_id})


def _pre_processor(image_size: int) -> Any:
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    transform = Compose([Resize((image_size, image_size), antialias=True), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return PreProcessor(transform=transform)


@dataclass(frozen=True)
class Fitted:
    """What training and prediction produced, before metrics."""

    pred: Predicted
    model_sha256: str
    fit_s: float
    test_s: float
    n_train: int


def fit_and_predict(spec: RunSpec, args: ModelArgs, device: str, workdir: Path) -> Fitted:
    """Train through anomalib's Engine and predict the test split."""
    from anomalib.engine import Engine
    from anomalib.post_processing import PostProcessor

    adapter = get_model(spec.model)
    model = adapter.build(
        args,
        pre_processor=_pre_processor(spec.data.image_size),
        # Raw scores: min-max normalisation would make scores depend on the other images.
        post_processor=PostProcessor(enable_normalization=False),
        train_batch_size=spec.data.train_batch_size,
    )
    datamodule = build_datamodule(spec.data, spec.category)
    engine = Engine(
        default_root_dir=workdir,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        barebones=True,  # no checkpoints, no files: the store is the only output
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=spec.deterministic,
        max_epochs=adapter.max_epochs(args),
    )
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    test_s = time.perf_counter() - t0
    pred = collect(list(batches or []), Path(spec.data.root).expanduser() / spec.category)
    return Fitted(pred, state_sha256(model.model), fit_s, test_s, len(datamodule.train_data))


def _params(spec: RunSpec, args: ModelArgs, data: DataCheck) -> dict[str, Any]:
    """Settings plus content hashes of what they point at: the data, the pretrained weights."""
    params = spec.params()
    params["data"]["sha256"] = data.sha256
    weights = get_model(spec.model).weights_file(args)
    if weights:
        params["model_args"] = {**params["model_args"], "weights_sha256": sha256_file(weights)}
    return params


def _predictions(fitted: Fitted) -> Predictions:
    pred = fitted.pred
    return Predictions(
        image_paths=pred.paths,
        labels=pred.labels.tolist(),
        image_scores=pred.scores.tolist(),
        scores_sha256=pred.scores_sha256,
        maps_sha256=pred.maps_sha256,
        model_sha256=fitted.model_sha256,
    )


def _timing(fitted: Fitted | None, total_s: float) -> Timing:
    if fitted is None:
        return Timing(fit_s=None, test_s=None, latency_ms_per_image=None, total_s=round(total_s, 4))
    return Timing(
        fit_s=round(fitted.fit_s, 4),
        test_s=round(fitted.test_s, 4),
        latency_ms_per_image=round(1000 * fitted.test_s / len(fitted.pred.paths), 4),
        total_s=round(total_s, 4),
    )


def run_one(spec: RunSpec) -> RunRecord:
    """Run one point of a study and return its record (the caller stores it)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it at import: before any import of it
    adapter = get_model(spec.model)
    args = adapter.Args.model_validate(spec.model_args)
    data = check_data(spec.data, spec.category)
    adapter.check(args)
    device = resolve_device(spec.device)
    with quiet():
        seed_everything(spec.seed, spec.deterministic, spec.resources.cpu)
        env = fingerprint(device, spec.resources.cpu)
        started = _now()
        t_start = time.perf_counter()
        error: str | None = None
        fitted: Fitted | None = None
        metrics: dict[str, float | None] = {}
        with MemoryMonitor(device) as mem, tempfile.TemporaryDirectory(prefix="harness-run-") as workdir:
            try:
                fitted = fit_and_predict(spec, args, device, Path(workdir))
                metrics = compute_metrics(fitted.pred)
            except HarnessError:
                raise
            except Exception as exc:  # recorded as a failed run, never swallowed
                last = traceback.extract_tb(exc.__traceback__)[-1]
                error = f"{type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})"
        total_s = time.perf_counter() - t_start
    return RunRecord(
        run_id=make_run_id(spec, env["hardware_id"]),
        sweep=spec.sweep,
        study=spec.study,
        model=spec.model,
        params=_params(spec, args, data),
        category=spec.category,
        seed=spec.seed,
        repeat=spec.repeat,
        status="failed" if error else "ok",
        error=error,
        metrics=metrics,
        predictions=_predictions(fitted) if fitted else None,
        timing=_timing(fitted, total_s),
        memory=mem.result(),
        data=DataInfo(
            root=str(data.root),
            sha256=data.sha256,
            n_train=fitted.n_train if fitted else None,
            n_test=len(fitted.pred.paths) if fitted else None,
        ),
        environment=env,
        started_at=started,
        finished_at=_now(),
    )
