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
import shutil
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.datasets import DataCheck, build_datamodule, check_data
from harness.errors import HarnessError
from harness.evaluate import Predicted, collect, compute_metrics
from harness.fingerprint import check_requested, environment_id, fingerprint
from harness.hashing import sha256_file, stable_hash, state_sha256
from harness.models import ModelArgs, SharedFeatures, get_model
from harness.record import DataInfo, Memory, Predictions, RunRecord, Timing, ValidationInfo
from harness.spec import RunSpec
from harness.streams import Streams

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    index = int(requested.partition(":")[2] or 0)
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        return f"cuda:{index}"
    if requested.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        seen = f"only {count} CUDA devices are visible" if count else "no CUDA device is visible"
        raise HarnessError(f"--device {requested}: {seen} to this process")
    return "cpu"


def execution_settings(spec: RunSpec, device: str) -> dict[str, Any]:
    """The execution settings the run applies, every one of them: what its variant sets, the
    defaults for the rest (a reused worker must not keep the last variant's)."""
    env = spec.environment
    return {
        "device": device,
        "threads": spec.threads,
        "matmul_precision": (env and env.matmul_precision) or "highest",
        "onednn": env.onednn if env and env.onednn is not None else True,
        "autocast": (env and env.autocast) or "fp32",
        "deterministic": spec.deterministic_mode,
    }


def seed_everything(seed: int, settings: dict[str, Any]) -> None:
    """Seed every RNG a run draws from and apply the execution settings.

    anomalib's coreset draws its start index from torch and its random projection from
    numpy's global RNG; the thread count changes float reduction order, so it is fixed too.
    """
    import torch

    deterministic, threads = settings["deterministic"], settings["threads"]
    torch.set_float32_matmul_precision(settings["matmul_precision"])
    torch.backends.mkldnn.enabled = settings["onednn"]
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


def make_run_id(spec: RunSpec, environment_id: str) -> str:
    """Stable over reruns of the same run in the same environment: the store's resume key."""
    return stable_hash({**spec.key(), "environment_id": environment_id})


def pre_processor(image_size: int) -> Any:
    """The one preprocessing every model gets: resize, ImageNet normalisation (benchmarks that
    build anomalib models by hand use it too, to compare like with like)."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    transform = Compose([Resize((image_size, image_size), antialias=True), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return PreProcessor(transform=transform)


@dataclass(frozen=True)
class Fitted:
    """What training and prediction produced, before metrics (no test predictions for a trial)."""

    pred: Predicted | None
    model_sha256: str
    fit_s: float
    test_s: float | None
    n_train: int


ValidationHook = Callable[[Predicted, int], None]  # an epoch's predictions, train images


def _validation_scores(on_scores: ValidationHook, base: Path) -> Any:
    """A Lightning callback that hands each epoch's raw validation predictions to ``on_scores``
    (with the number of training images, which the split decided).

    Callbacks see a batch before the module's own ``on_validation_batch_end``, where GANomaly
    min-max normalises scores with a running min/max; the raw scores are copied first.
    """
    from lightning.pytorch.callbacks import Callback

    fields = ("pred_score", "gt_label", "anomaly_map", "gt_mask")

    class ValidationScores(Callback):
        def __init__(self) -> None:
            self.batches: list[SimpleNamespace] = []

        def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.batches = []

        def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
            copied = {f: None if getattr(outputs, f) is None else getattr(outputs, f).detach().clone() for f in fields}
            self.batches.append(SimpleNamespace(image_path=list(outputs.image_path), **copied))

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking and self.batches:
                on_scores(collect(self.batches, base), len(trainer.datamodule.train_data))

    return ValidationScores()


def build_validation_split(datamodule: Any, workdir: Path, streams: Streams) -> None:
    """Build a trial's validation split now, the same for every trial of a search.

    anomalib picks which held-out images get synthetic anomalies with numpy's global RNG and
    draws the anomalies from torch's, whose states by then depend on the trial's model
    (its initialisation draws from them): the draws are made from the ``split`` stream instead. It
    takes anomaly textures from ``./datasets/dtd`` when that exists in the working folder,
    so the split is built from an empty one: always Perlin noise, wherever the trial runs.
    The synthetic images are written in ``workdir`` too, and go with it (see ``_synthetic_root``).
    """
    from lightning.pytorch.trainer.states import TrainerFn

    with streams.drawing("split"), _synthetic_root(workdir / "synthetic_anomaly"), contextlib.chdir(workdir):
        datamodule.setup(TrainerFn.FITTING)  # a trainer-stage setup: fit() does not redo it
    # The workdir owns the images: the dataset deleting them when collected, after the run
    # removed the workdir, would fail.
    datamodule.val_data._cleanup = False


@contextlib.contextmanager
def _synthetic_root(root: Path) -> Iterator[None]:
    """Have anomalib write synthetic anomalies under ``root`` while a split is built.

    It writes them under ``$TMPDIR/anomalib/synthetic_anomaly`` (its module's ``ROOT``) and
    deletes them only when the dataset object is collected: not while a run's datamodule is
    still referenced, never in a Ray worker that is killed (every search left folders there).
    """
    from anomalib.data.utils import synthetic

    default, synthetic.ROOT = synthetic.ROOT, root.absolute()
    try:
        yield
    finally:
        synthetic.ROOT = default


def _shuffle_from(datamodule: Any, generator: torch.Generator | None) -> None:
    """Have the training loader shuffle with ``generator`` (the ``order`` stream), when given."""
    if generator is None:
        return
    make_loader = datamodule.train_dataloader

    def train_dataloader() -> Any:
        loader = make_loader()
        if hasattr(loader.sampler, "generator"):
            loader.sampler.generator = generator
        return loader

    datamodule.train_dataloader = train_dataloader


def _record_train_order(datamodule: Any, features: SharedFeatures) -> None:
    """Have the training loader write its order of images into ``features.order``.

    The loader's ``RandomSampler`` is given a subclass that draws its permutation exactly as
    before (one seed from torch's global RNG, when iteration starts) and keeps it.
    """
    from torch.utils.data import RandomSampler, SequentialSampler

    class RecordingSampler(RandomSampler):
        def __iter__(self) -> Iterator[int]:
            order = list(super().__iter__())
            features.order = order
            yield from order

    make_loader = datamodule.train_dataloader

    def train_dataloader() -> Any:
        loader = make_loader()
        sampler, n = loader.sampler, len(loader.dataset)
        if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == n:
            sampler.__class__ = RecordingSampler  # a permutation of every image, as anomalib shuffles
        elif type(sampler) is SequentialSampler:
            features.order = list(range(n))
        else:
            raise HarnessError(f"training features cannot be shared with a {type(sampler).__name__} loader")
        return loader

    datamodule.train_dataloader = train_dataloader
    features.order = None


def fit_and_predict(
    spec: RunSpec,
    args: ModelArgs,
    device: str,
    workdir: Path,
    on_val: ValidationHook | None = None,
    features: SharedFeatures | None = None,
) -> Fitted:
    """Train through anomalib's Engine; predict the test split, or for a trial validate each epoch.

    With ``features`` already extracted, training sees one batch: the data loaders are made
    and drawn from as in a full epoch (the RNGs advance the same way), the model then takes
    the shared features instead of its own.
    """
    from anomalib.engine import Engine
    from anomalib.post_processing import PostProcessor

    adapter = get_model(spec.model)
    streams = spec.random_streams()
    with streams.drawing("init"):
        model = adapter.build(
            args,
            pre_processor=pre_processor(spec.data.image_size),
            # Raw scores: min-max normalisation would make scores depend on the other images.
            post_processor=PostProcessor(enable_normalization=False),
            train_batch_size=spec.data.train_batch_size,
            features=features,
            streams=streams,
        )
    datamodule = build_datamodule(spec.data, spec.category, spec.validation)
    _shuffle_from(datamodule, streams.generator("order"))
    if features is not None:
        _record_train_order(datamodule, features)
    base = Path(spec.data.root).expanduser() / spec.category
    trial = spec.validation is not None
    if trial:
        build_validation_split(datamodule, workdir, streams)
    engine = Engine(
        default_root_dir=workdir,
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        barebones=True,  # no checkpoints, no files: the store is the only output
        limit_val_batches=1.0 if trial else 0,
        limit_train_batches=1 if features is not None and features.embedding is not None else 1.0,
        num_sanity_val_steps=0,
        callbacks=[_validation_scores(on_val, base)] if trial and on_val else None,
        deterministic=spec.deterministic_mode,
        precision="bf16-mixed" if spec.environment and spec.environment.autocast == "bf16" else "32-true",
        max_epochs=adapter.max_epochs(args),
    )
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - t0
    n_train = len(datamodule.train_data)
    if trial:  # a trial never looks at the test split
        return Fitted(None, state_sha256(model.model), fit_s, None, n_train)
    t0 = time.perf_counter()
    batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    test_s = time.perf_counter() - t0
    pred = collect(list(batches or []), base)
    return Fitted(pred, state_sha256(model.model), fit_s, test_s, n_train)


def _params(spec: RunSpec, args: ModelArgs, data: DataCheck) -> dict[str, Any]:
    """Settings plus content hashes of what they point at: the data, the pretrained weights."""
    params = spec.params()
    params["data"]["sha256"] = data.sha256
    weights = get_model(spec.model).weights_file(args)
    if weights:
        params["model_args"] = {**params["model_args"], "weights_sha256": sha256_file(weights)}
    return params


def _predictions(pred: Predicted, model_sha256: str) -> Predictions:
    return Predictions(
        image_paths=pred.paths,
        labels=pred.labels.tolist(),
        image_scores=pred.scores.tolist(),
        scores_sha256=pred.scores_sha256,
        maps_sha256=pred.maps_sha256,
        model_sha256=model_sha256,
    )


def _timing(fitted: Fitted | None, total_s: float) -> Timing:
    if fitted is None or fitted.pred is None or fitted.test_s is None:  # failed, or a trial
        fit_s = round(fitted.fit_s, 4) if fitted else None
        return Timing(fit_s=fit_s, test_s=None, latency_ms_per_image=None, total_s=round(total_s, 4))
    return Timing(
        fit_s=round(fitted.fit_s, 4),
        test_s=round(fitted.test_s, 4),
        latency_ms_per_image=round(1000 * fitted.test_s / len(fitted.pred.paths), 4),
        total_s=round(total_s, 4),
    )


def run_environment_id(spec: RunSpec) -> str:
    """The ``environment_id`` this process gives the run (its run id includes it)."""
    device = resolve_device(spec.device)
    return environment_id(device, execution_settings(spec, device))


def planned_run_id(spec: RunSpec) -> str:
    """The id ``run_one`` will give this run here, without running it: what a sweep resumes by."""
    return make_run_id(spec, run_environment_id(spec))


def run_fingerprint(spec: RunSpec, device: str) -> dict[str, Any]:
    requested = spec.environment.settings() if spec.environment else {}
    return fingerprint(device, execution_settings(spec, device), spec.environment_name, requested)


@dataclass
class RunState:
    """What a run's record is made of, gathered as the run goes (``build_record`` makes it)."""

    spec: RunSpec
    environment: dict[str, Any]
    params: dict[str, Any]  # the spec's settings, with content hashes once the data was read
    data_root: str
    data_sha256: str | None
    memory: MemoryMonitor | None = None  # None: the run never started, nothing was measured
    features: dict[str, Any] | None = None
    started: str = field(default_factory=_now)
    t_start: float = field(default_factory=time.perf_counter)
    curve: list[dict[str, int | float | None]] = field(default_factory=list)  # a trial's, per epoch
    n_val: int = 0
    n_val_anomalous: int = 0
    n_train: int | None = None  # known once the data is split

    @classmethod
    def unstarted(cls, spec: RunSpec) -> RunState:
        """A run that could not start where it was sent: no data read, nothing measured."""
        try:
            device = resolve_device(spec.device)
        except HarnessError:
            device = "cpu"
        return cls(spec, run_fingerprint(spec, device), spec.params(), spec.data.root, None)

    def last_validation(self) -> dict[str, float | None]:
        return {k: v for k, v in (self.curve[-1] if self.curve else {}).items() if k != "epoch"}

    def validation(self) -> ValidationInfo | None:
        if self.spec.validation is None:
            return None
        return ValidationInfo(
            split=self.spec.validation.split,
            ratio=self.spec.validation.ratio,
            n_val=self.n_val,
            n_val_anomalous=self.n_val_anomalous,
            curve=list(self.curve),
        )


def build_record(
    state: RunState, fitted: Fitted | None, metrics: dict[str, float | None], error: str | None = None
) -> RunRecord:
    """The one place a run record is made: finished, failed, a trial mid-search, or unstarted."""
    spec = state.spec
    pred = fitted.pred if fitted else None
    unmeasured = Memory(peak_rss_bytes=0, process_peak_rss_bytes=0, peak_gpu_bytes=None)
    memory = state.memory.result() if state.memory else unmeasured
    return RunRecord(
        run_id=make_run_id(spec, state.environment["environment_id"]),
        sweep=spec.sweep,
        study=spec.study,
        model=spec.model,
        params=state.params,
        category=spec.category,
        seed=spec.seed,
        repeat=spec.repeat,
        status="failed" if error else "ok",
        error=error,
        metrics=metrics,
        predictions=_predictions(pred, fitted.model_sha256) if fitted and pred is not None else None,
        timing=_timing(fitted, time.perf_counter() - state.t_start),
        memory=memory,
        data=DataInfo(
            root=state.data_root,
            sha256=state.data_sha256,
            n_train=fitted.n_train if fitted else state.n_train,
            n_test=len(pred.paths) if pred is not None else None,
        ),
        environment=state.environment,
        started_at=state.started,
        finished_at=_now(),
        role=spec.role,
        validation=state.validation(),
        selection=spec.selection,
        features=state.features,
        streams=spec.random_streams().seeds,
        seeds_plan=spec.seeds_plan.plan() if spec.seeds_plan else None,
    )


EpochHook = Callable[[RunRecord], None]


FeatureCache = dict[str, SharedFeatures]


def shared_features(
    cache: FeatureCache | None, spec: RunSpec, args: ModelArgs, data: DataCheck, device: str
) -> SharedFeatures | None:
    """The cache's entry for this run's training features, when they do not depend on the seed.

    The key is everything but the seed: model, every setting with the content hashes of data
    and weights, the execution settings and environment (all can change float results), and
    the repeat: each repeat extracts its own, so repeats still test that extraction is
    deterministic.
    """
    if cache is None or not get_model(spec.model).shares_features(args):
        return None
    settings = execution_settings(spec, device)
    key = stable_hash([spec.model, _params(spec, args, data), environment_id(device, settings), spec.repeat])
    return cache.setdefault(key, SharedFeatures(key))


def run_one(spec: RunSpec, on_epoch: EpochHook | None = None, cache: FeatureCache | None = None) -> RunRecord:
    """Run one point of a study and return its record (the caller stores it).

    For an HPO trial (``spec.validation``) the model is scored on the validation split after
    every epoch, and ``on_epoch`` gets the record as it stands (a scheduler may stop there).
    Runs of a seed study that share a ``cache`` extract fixed-backbone features only once.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it at import: before any import of it
    adapter = get_model(spec.model)
    args = adapter.Args.model_validate(spec.model_args)
    data = check_data(spec.data, spec.category)
    adapter.check(args)
    if spec.environment is not None:
        check_requested(spec.environment.settings())
    device = resolve_device(spec.device)
    shared = shared_features(cache, spec, args, data, device)
    info = None if shared is None else {"key": shared.key, "reused": shared.embedding is not None}
    with quiet():
        seed_everything(spec.seed, execution_settings(spec, device))
        monitor = MemoryMonitor(device)
        env = run_fingerprint(spec, device)
        state = RunState(spec, env, _params(spec, args, data), str(data.root), data.sha256, monitor, info)

        def on_val(pred: Predicted, n_train: int) -> None:
            val = {f"val_{k}": v for k, v in compute_metrics(pred).items()}
            state.curve.append({"epoch": len(state.curve) + 1, **val})
            state.n_val, state.n_val_anomalous, state.n_train = len(pred.paths), int(pred.labels.sum()), n_train
            if on_epoch is not None:
                on_epoch(build_record(state, None, state.last_validation()))

        error: str | None = None
        fitted: Fitted | None = None
        metrics: dict[str, float | None] = {}
        remove_dead_workdirs()
        with monitor, tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as workdir:
            try:
                fitted = fit_and_predict(spec, args, device, Path(workdir), on_val, shared)
                metrics = compute_metrics(fitted.pred) if fitted.pred is not None else state.last_validation()
            except HarnessError:
                raise
            except Exception as exc:  # recorded as a failed run, never swallowed
                last = traceback.extract_tb(exc.__traceback__)[-1]
                error = f"{type(exc).__name__}: {exc} (at {Path(last.filename).name}:{last.lineno})"
        return build_record(state, fitted, metrics, error)


WORKDIR_PREFIX = "harness-run-"  # + the pid of the process whose run's work folder it is


def remove_dead_workdirs() -> None:
    """Remove the work folders of runs whose process was killed (a lost Ray worker leaves its
    run's synthetic anomalies and Lightning files behind); a live process's folder stays."""
    import psutil

    for folder in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = folder.name.removeprefix(WORKDIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def unstarted_record(spec: RunSpec, error: str) -> RunRecord:
    """A failed record for a sweep's run that could not start where it was sent.

    On a cluster the data or weights may be missing on one node only: the sweep stores that
    as the run's failure (and goes on) where ``harness run`` would stop with the error.
    """
    return build_record(RunState.unstarted(spec), None, {}, error)
