"""Experiment specs: strict loading, ``--set`` overrides, and expansion into runs.

One config system (pydantic v2, ``extra="forbid"``): a misspelt key is an error naming the
key, never a setting that silently does nothing. ``harness run`` builds the same spec from
its flags, so a single run and a sweep's run are the same thing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path, PurePath, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.errors import HarnessError
from harness.fingerprint import ONEDNN_NEEDS
from harness.hashing import stable_hash
from harness.models import get_model
from harness.record import QUALITY, Role, SeedsPlan, load_time_env
from harness.streams import FOLLOW, Streams

Device = Literal["auto", "cpu", "cuda"]
# oneDNN's ISA caps (its DNNL_MAX_CPU_ISA values), lower to higher.
ONEDNN_ISAS = (*ONEDNN_NEEDS, "ALL")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _one_directory(name: str) -> str:
    """A category is joined under ``data.root``: one directory name, never a way out of the root."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"{name!r} is not one directory name under data.root (not '.' or '..'; no /, \\ or NUL)")
    return name


Category = Annotated[str, AfterValidator(_one_directory)]


class DataSpec(StrictModel):
    """Where the images are and how every model sees them (the shared preprocessing)."""

    format: Literal["mvtec", "folder"] = "mvtec"
    root: str = "datasets/MVTecAD"
    categories: list[Category] = Field(min_length=1)
    image_size: int = Field(default=256, ge=32, le=1024)
    train_batch_size: int = Field(default=32, ge=1)
    eval_batch_size: int = Field(default=32, ge=1)
    num_workers: int = Field(default=0, ge=0, le=64)
    # Folder format: sub-directories of ROOT/<category>. The normal test images are
    # `normal_test_dir` when given, else a fixed-seed `normal_split_ratio` share of `normal_dir`.
    normal_dir: str = Field(default="good", min_length=1)
    abnormal_dir: str = Field(default="defect", min_length=1)
    mask_dir: str | None = Field(default=None, min_length=1)
    normal_test_dir: str | None = Field(default=None, min_length=1)
    normal_split_ratio: float = Field(default=0.2, gt=0, lt=1)

    @field_validator("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir")
    @classmethod
    def _inside_category(cls, sub: str | None) -> str | None:
        """Joined under ROOT/<category>: a relative path that stays inside it."""
        if sub is not None and ("\0" in sub or PurePosixPath(sub).is_absolute() or ".." in PurePosixPath(sub).parts):
            raise ValueError(f"{sub!r} is not a path inside the category directory (relative, no '..' or NUL)")
        return sub


class EnvVariant(StrictModel):
    """One named execution environment of a study: what it changes from the one it runs in.

    ``aten_cpu_capability`` and ``onednn_max_isa`` are read by torch once, when it loads: a
    variant that sets them runs in worker processes started with them (``env_vars``). The
    rest are set by the run itself; unset ones take their defaults (``execution_settings``).
    """

    threads: int | None = Field(default=None, ge=1, le=256)
    # ATen's dispatch levels: x86 default, avx2, avx512; s390x zvector; aarch64 sve256.
    aten_cpu_capability: Literal["default", "avx2", "avx512", "zvector", "sve256"] | None = None
    onednn_max_isa: str | None = None
    onednn: bool | None = None  # False: torch.backends.mkldnn off (ATen's own kernels)
    matmul_precision: Literal["highest", "high", "medium"] | None = None
    autocast: Literal["fp32", "bf16"] | None = None
    device: str | None = Field(default=None, pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    deterministic: bool | None = None

    @field_validator("onednn_max_isa")
    @classmethod
    def _isa(cls, isa: str | None) -> str | None:
        if isa is None:
            return None
        if isa.upper() not in ONEDNN_ISAS:
            raise ValueError(f"{isa!r} is not a oneDNN ISA ({', '.join(ONEDNN_ISAS)})")
        return isa.upper()

    def env_vars(self) -> dict[str, str]:
        """What the worker process must be started with (torch reads these when it loads)."""
        return load_time_env(self.settings())

    def settings(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


ENV_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ResourcesSpec(StrictModel):
    """Per-run resources; ``cpu`` is also the torch thread count (it changes GANomaly's numbers)."""

    cpu: int = Field(default=2, ge=1, le=256)
    gpu: float = Field(default=0, ge=0, le=8)


WANDB_NAME = r"^[^/\\#?%:\s]+$"  # what W&B accepts in a project or entity name


class WandbSpec(StrictModel):
    """Where runs go in W&B. ``WANDB_MODE`` in the environment overrides ``mode``; the API key
    comes from ``WANDB_API_KEY`` only, never from a spec."""

    project: str = Field(default="ad-stability", max_length=128, pattern=WANDB_NAME)
    entity: str | None = Field(default=None, pattern=WANDB_NAME)  # None: the key's default entity
    mode: Literal["offline", "online", "disabled"] = "offline"


class TrackingSpec(StrictModel):
    wandb: WandbSpec | None = None


class SearchDim(StrictModel):
    """One dimension of an HPO search space, as Ray Tune samples it.

    ``choice`` takes ``values``; ``uniform``, ``loguniform`` and ``randint`` take ``low`` and
    ``high`` (``randint``'s ``high`` is exclusive, as in Tune).
    """

    type: Literal["choice", "uniform", "loguniform", "randint"]
    values: list[Any] | None = Field(default=None, min_length=1)
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> SearchDim:
        if self.type == "choice":
            if self.values is None or self.low is not None or self.high is not None:
                raise ValueError("choice takes `values` (a non-empty list) and no low/high")
            return self
        if self.values is not None or self.low is None or self.high is None:
            raise ValueError(f"{self.type} takes `low` and `high`, not values")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        if self.type == "randint" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("randint needs integer low and high")
        return self

    def corners(self) -> list[Any]:
        """Values that bound what the dimension can sample: each must give a valid spec."""
        if self.values is not None:
            return list(self.values)
        assert self.low is not None
        assert self.high is not None
        if self.type == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


class SchedulerSpec(StrictModel):
    """Trial scheduler: ASHA stops weak trials at rungs of epochs; FIFO runs every trial out."""

    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2, gt=1)


class ValidationSpec(StrictModel):
    """How HPO trials are scored without the test split.

    ``synthetic``: a fixed-seed ``ratio`` of the training images is held out and anomalib
    pastes synthetic anomalies onto part of them; the test split is never read by a trial.
    """

    split: Literal["synthetic"] = "synthetic"
    ratio: float = Field(default=0.5, gt=0, lt=1)


class AdaptiveSeeds(StrictModel):
    """Seeds 0, 1, 2, ... run in rounds until the CI of ``metric``'s mean is narrow enough:
    ``min`` first, then ``round`` more at a time while a group's 95% CI half-width is above
    ``ci_halfwidth``, never more than ``max`` (docs/specs.md, Adaptive seed studies)."""

    metric: str = "image_AUROC"
    ci_halfwidth: float = Field(gt=0, allow_inf_nan=False)
    min: int = Field(ge=2)  # one seed has no interval
    max: int = Field(le=10_000)
    round: int = Field(default=5, ge=1)

    @field_validator("metric")
    @classmethod
    def _quality(cls, metric: str) -> str:
        if metric not in QUALITY:
            raise ValueError(f"{metric!r} is not a quality metric ({', '.join(QUALITY)})")
        return metric

    @model_validator(mode="after")
    def _bounds(self) -> AdaptiveSeeds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self

    def plan(self) -> SeedsPlan:
        """The plan as its runs record it."""
        return SeedsPlan(**self.model_dump())


class SeedRounds(StrictModel):
    """``seeds: {adaptive: {...}}``: the form that tells an adaptive study from a list of seeds."""

    adaptive: AdaptiveSeeds


def _seeds_form(value: Any) -> str:
    return "adaptive" if isinstance(value, dict | SeedRounds) else "list"


# A list of seeds, or a mapping; which form is decided by the value's type, so an error names
# the key in the form written (pydantic's union would report a failure for both).
Seeds = Annotated[
    Annotated[list[int], Tag("list")] | Annotated[SeedRounds, Tag("adaptive")],
    Discriminator(_seeds_form),
]
SEEDS_FORMS = ("list", "adaptive")  # the tags above: pydantic puts one in an error's location


# What a search may vary: the model's arguments and how images are fed, never what the
# study is (its data, categories, seeds) or how it is scored.
SEARCHABLE_PREFIXES = ("model_args.",)
SEARCHABLE_KEYS = ("data.image_size", "data.train_batch_size")
HPO_METRICS = ("val_image_AUROC", "val_image_F1Max", "val_pixel_AUROC", "val_pixel_AUPRO")
SWEEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # a directory name in RESULTS, nothing more
HPO_ONLY_KEYS = ("search_space", "num_samples", "metric", "mode", "scheduler", "search", "validation", "tune_storage")


class ExperimentSpec(StrictModel):
    """A whole study as users write it in ``experiments/*.yaml`` (every key: docs/specs.md)."""

    name: str = Field(default="adhoc", pattern=SWEEP_NAME)
    study: Literal["seeds", "hpo"] = "seeds"
    model: str
    model_args: dict[str, Any] = Field(default_factory=dict)
    data: DataSpec
    seeds: Seeds = [0]
    repeats: int = Field(default=1, ge=1, le=100)
    deterministic: bool = True
    resources: ResourcesSpec = ResourcesSpec()
    # Named random streams pinned to a seed ({init: 0}); the others follow each run's seed
    # (harness/streams.py). `seed` spells "follows" explicitly (the only way to vary `split`).
    streams: dict[str, Annotated[int, Field(ge=0, lt=2**32)] | Literal["seed"]] | None = None
    # Variance by source: per listed stream, the study again with only that stream following
    # the seed (the others pinned to `streams`' value, else to the first seed).
    sources: list[str] | None = Field(default=None, min_length=1)
    # Runs (or trials) in flight at once; 0: as many as the cluster's resources allow.
    max_concurrent: int = Field(default=0, ge=0)
    tracking: TrackingSpec = TrackingSpec()
    # Named execution environments: every run (every search) once in each. None: the one it is in.
    environments: dict[str, EnvVariant] | None = Field(default=None, min_length=1)
    # study: hpo only.
    search_space: dict[str, SearchDim] | None = None
    num_samples: int = Field(default=8, ge=1, le=10_000)
    metric: Literal["val_image_AUROC", "val_image_F1Max", "val_pixel_AUROC", "val_pixel_AUPRO"] = "val_image_AUROC"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec = SchedulerSpec()
    search: Literal["random", "optuna", "hyperopt"] = "random"
    validation: ValidationSpec = ValidationSpec()
    # Ray Tune's storage_path: a path all nodes share, or a URI (s3://, gs://); default
    # RESULTS/<name>/tune on the driver. Tune keeps its trial logs there, the store the records.
    tune_storage: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _study_keys(self) -> ExperimentSpec:
        if self.study == "hpo" and self.adaptive is not None:
            raise ValueError("seeds.adaptive: only for study: seeds")
        if self.study == "seeds":
            stray = [k for k in HPO_ONLY_KEYS if k in self.model_fields_set]
            if stray:
                raise ValueError(f"{stray[0]}: only for study: hpo")
        elif not self.search_space:
            raise ValueError("search_space: study: hpo needs at least one dimension to search")
        for key in self.search_space or {}:
            if not (key.startswith(SEARCHABLE_PREFIXES) or key in SEARCHABLE_KEYS):
                raise ValueError(f"search_space.{key}: not searchable (model_args.* or {', '.join(SEARCHABLE_KEYS)})")
        self._check_environments()
        self._check_streams()
        return self

    def _check_streams(self) -> None:
        own = get_model(self.model).streams
        allowed = (*own, "split") if self.study == "hpo" else own
        for name in self.streams or {}:
            if name not in allowed:
                why = "a search trial's only" if name == "split" else f"not one {self.model} draws from"
                raise ValueError(f"streams.{name}: {why} (streams: {', '.join(allowed)})")
        if self.sources is not None:
            if self.study != "seeds":
                raise ValueError("sources: only for study: seeds")
            if self.adaptive is not None:
                raise ValueError("sources: not with adaptive seeds (each source needs the same seeds as its reference)")
            for name in self.sources:
                if name not in own:
                    raise ValueError(f"sources: {name} is not a stream {self.model} draws from ({', '.join(own)})")
            if len(set(self.sources)) != len(self.sources):
                raise ValueError("sources: a stream is listed twice")

    def stream_pins(self, source: str | None = None) -> dict[str, int | str] | None:
        """Each run's pins: the spec's, or for a ``source`` study every model stream but
        ``source`` pinned (to the spec's value, else the first seed)."""
        if source is None:
            return dict(self.streams) if self.streams else None
        pins = self.streams or {}
        first = self.seed_list()[0]
        return {
            name: FOLLOW if name == source else (pins[name] if pins.get(name, FOLLOW) != FOLLOW else first)
            for name in get_model(self.model).streams
        }

    def _check_environments(self) -> None:
        """Variants that could not run as asked are refused now, before any run."""
        seen: dict[str, str] = {}
        for name, env in (self.environments or {}).items():
            where = f"environments.{name}"
            if not re.match(ENV_NAME, name):
                raise ValueError(f"{where}: a name of letters, digits, '.', '_' or '-' (up to 64)")
            if env.threads is not None and env.threads > self.resources.cpu:
                raise ValueError(f"{where}.threads={env.threads} is more than resources.cpu={self.resources.cpu}")
            if env.device and env.device.startswith("cuda"):
                index = int(env.device.partition(":")[2] or 0)
                if self.resources.gpu < index + 1:
                    raise ValueError(
                        f"{where}.device={env.device} needs resources.gpu >= {index + 1} (it is {self.resources.gpu:g})"
                    )
            key = stable_hash(env.settings())
            if key in seen:
                raise ValueError(f"{where}: the same settings as environments.{seen[key]}")
            seen[key] = name

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        try:
            get_model(name)
        except HarnessError as exc:
            raise ValueError(str(exc)) from None
        return name

    @field_validator("seeds")
    @classmethod
    def _seeds_range(cls, seeds: list[int] | SeedRounds) -> list[int] | SeedRounds:
        if isinstance(seeds, SeedRounds):
            return seeds
        if not seeds:
            raise ValueError("no seeds: list at least one")
        bad = [s for s in seeds if not 0 <= s < 2**32]
        if bad:
            raise ValueError(f"seed {bad[0]} is outside 0..2**32-1")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds repeat; use `repeats` for same-seed reruns")
        return seeds

    @property
    def adaptive(self) -> AdaptiveSeeds | None:
        """An adaptive study's rounds (None: the seeds are a list)."""
        return self.seeds.adaptive if isinstance(self.seeds, SeedRounds) else None

    def seed_list(self) -> list[int]:
        """The seeds to run: the list, or an adaptive study's first round (0 .. min-1)."""
        if isinstance(self.seeds, SeedRounds):
            return list(range(self.seeds.adaptive.min))
        return list(self.seeds)

    def model_params(self) -> dict[str, Any]:
        """The model's arguments with defaults filled in, validated by its adapter."""
        return get_model(self.model).Args.model_validate(self.model_args).model_dump(mode="json")


class RunSpec(StrictModel):
    """Everything one run needs: a point of the study's grid."""

    sweep: str
    study: str
    model: str
    model_args: dict[str, Any]
    data: DataSpec
    category: Category
    seed: int
    repeat: int
    deterministic: bool
    resources: ResourcesSpec
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    # The named environment the run is made in (None: the worker's own, as it is).
    environment_name: str | None = None
    environment: EnvVariant | None = None
    # HPO: a trial is scored on `validation` (never the test split); a best-config run
    # carries how its configuration was selected.
    role: Role = "run"
    validation: ValidationSpec | None = None
    selection: dict[str, Any] | None = None
    # Random streams pinned (stream: seed, or "seed": follows the run's): see harness/streams.py.
    streams: dict[str, int | str] | None = None
    # An adaptive seed study's rounds: recorded, not in the key (a seed is the same run).
    seeds_plan: AdaptiveSeeds | None = None

    def key(self) -> dict[str, Any]:
        """What identifies the run in the store (the run id adds the hardware).

        The data root and weights path are in, as written (not resolved: a job's working
        directory changes), so other data or weights is another run; the content behind
        them is hashed into the record, not here, so a driver can decide what to resume
        without reading the data.
        """
        key = {
            "sweep": self.sweep,
            "model": self.model,
            "params": self.params(),
            "paths": {"data_root": self.data.root, "weights": self.model_args.get("weights")},
            "category": self.category,
            "seed": self.seed,
            "repeat": self.repeat,
        }
        if self.role != "run":  # (a study's runs keep the ids they had before roles existed)
            key["role"] = self.role
        if self.role == "trial" and self.selection:
            key["scheduler"] = self.selection.get("scheduler")  # it decides where the curve ends
        if self.role == "best" and self.selection:
            # Chosen by another rule or from another trial: another run, not a stored one.
            key["selected_by"] = {k: self.selection.get(k) for k in ("metric", "mode", "trial_run_id")}
        return key

    @property
    def variant(self) -> str | None:
        return self.environment_name

    @property
    def threads(self) -> int:
        """torch's thread count: the variant's, else one per reserved CPU."""
        env = self.environment
        return env.threads if env and env.threads else self.resources.cpu

    @property
    def deterministic_mode(self) -> bool:
        """Whether the run asks torch for deterministic algorithms: the variant's say, else the spec's."""
        env = self.environment
        return env.deterministic if env and env.deterministic is not None else self.deterministic

    def env_vars(self) -> dict[str, str]:
        return self.environment.env_vars() if self.environment else {}

    def params(self) -> dict[str, Any]:
        """Model and data settings, with no machine's paths in them.

        Where the data or a weights file lies differs between machines and says nothing of
        what they hold, so the data root is left out and a weights path is cut to its file
        name; the run adds content hashes of both to its record.
        """
        data = self.data.model_dump(mode="json", exclude={"root", "categories"})
        model_args = dict(self.model_args)
        if model_args.get("weights"):
            model_args["weights"] = PurePath(model_args["weights"]).name
        params = {"model_args": model_args, "data": data, "deterministic": self.deterministic}
        if self.validation is not None:
            params["validation"] = self.validation.model_dump(mode="json")
        if self.streams:  # (runs with nothing pinned keep the params, and ids, they had before)
            params["streams"] = dict(sorted(self.streams.items()))
        return params

    def random_streams(self) -> Streams:
        """Each named stream's seed in this run: the model's streams, and a trial's split."""
        names = get_model(self.model).streams
        return Streams.of(self.seed, (*names, "split") if self.role == "trial" else names, self.streams)


MAX_SPEC_BYTES = 1 << 20  # a spec is a few dozen lines
MAX_SPEC_VALUES = 100_000  # values of a document once its YAML aliases are expanded
# Where a key was set, for errors: "--set repeats=two", or `harness run`'s "--category".
Origins = dict[str, str]


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.2's booleans: only true and false. YAML 1.1's yes/no/on/off load as strings,
    which a boolean key then refuses, rather than `pre_trained: no` silently reading false."""


_BOOL = "tag:yaml.org,2002:bool"
_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SpecLoader)  # a SafeLoader


def _plain(doc: Any, where: str = "") -> Any:
    """A loaded document as a plain tree: aliases expanded (a 500-byte alias bomb expands to
    billions of values, so the count is bounded), no cycles, keys and odd scalars as strings."""
    count = 0
    open_ids: set[int] = set()

    def copy(node: Any) -> Any:
        nonlocal count
        count += 1
        if count > MAX_SPEC_VALUES:
            raise HarnessError(f"{where}more than {MAX_SPEC_VALUES:,} values once YAML aliases are expanded")
        if not isinstance(node, dict | list):
            return node if node is None or isinstance(node, str | int | float) else str(node)
        if id(node) in open_ids:
            raise HarnessError(f"{where}a YAML alias inside its own anchor (a cycle)")
        open_ids.add(id(node))
        out = {_key(k): copy(v) for k, v in node.items()} if isinstance(node, dict) else [copy(v) for v in node]
        open_ids.discard(id(node))
        return out

    return copy(doc)


def _key(key: Any) -> str:
    """A mapping key as JSON would write it (``1`` -> ``"1"``, ``true`` -> ``"true"``)."""
    if isinstance(key, str):
        return key
    return json.dumps(key) if key is None or isinstance(key, int | float) else str(key)


def _origin(key: str, origins: Origins) -> str | None:
    """What set ``key`` (or the key it is under), if an override or a flag did."""
    found = [k for k in origins if key == k or key.startswith(f"{k}.")]
    return origins[max(found, key=len)] if found else None


def _error(where: str, key: str, msg: str, origins: Origins | None) -> HarnessError:
    """``where: key: msg``, where ``where`` is the override or flag that set the key, if one did."""
    origin = _origin(key, origins or {}) if key else None
    head = f"{origin}: " if origin else where
    return HarnessError(f"{head}{key}: {msg}" if key else f"{head}{msg}")


def _why(err: ValidationError) -> str:
    """The first error's message, in the words of a spec (and a hint where one helps)."""
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "list_type" and isinstance(first["input"], str):
        msg += f" (write a list in brackets: [{first['input']}])"
    return f"{msg} (and {err.error_count() - 1} more)" if err.error_count() > 1 else msg


def _loose_bool(raw: Any, valid: Any, key: tuple[str, ...] = ()) -> tuple[str, Any] | None:
    """The first value validation read as a boolean that was not written true or false
    (pydantic reads "no", "off", 0 as false), with its dotted key."""
    if isinstance(valid, bool):
        return None if isinstance(raw, bool) else (".".join(key), raw)
    if isinstance(raw, dict) and isinstance(valid, dict):
        pairs = [(str(k), v, valid[k]) for k, v in raw.items() if k in valid]
    elif isinstance(raw, list) and isinstance(valid, list) and len(raw) == len(valid):
        pairs = [(str(i), v, valid[i]) for i, v in enumerate(raw)]
    else:
        return None
    for name, r, v in pairs:
        if found := _loose_bool(r, v, (*key, name)):
            return found
    return None


def parse_set(items: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``key.sub=value`` overrides; values are YAML scalars (``false``, ``64``, ``[a]``)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise HarnessError(f"--set {item!r}: expected key=value with a dotted key, e.g. data.image_size=64")
        try:
            value = _plain(_load_yaml(raw), f"--set {item}: ") if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as exc:
            raise HarnessError(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
        out.append((parts, value))
    return out


def set_origins(items: list[str]) -> Origins:
    """Each ``--set`` key to its item, so an error in its value names the override, not the spec."""
    return {item.partition("=")[0].strip(): f"--set {item}" for item in items}


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """Set each dotted key in a copy of ``raw``; validation afterwards names any bad key."""
    doc = _plain(raw)
    for parts, value in overrides:
        node = doc
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise HarnessError(f"--set {'.'.join(parts)}: {p} is not a mapping")
            node = child
        node[parts[-1]] = value
    return doc


def validate_spec(raw: dict[str, Any], source: str = "", origins: Origins | None = None) -> ExperimentSpec:
    """Validate a spec document and the model's own arguments; one-line errors (``source: key: why``,
    or ``--set key=value: key: why`` for a key an override in ``origins`` set)."""
    where = f"{source}: " if source else ""
    spec = _validate(raw, where, origins)
    # Every value a search can sample must make a valid spec: fail now, not in trial 37.
    for key, dim in (spec.search_space or {}).items():
        for value in dim.corners():
            _validate(apply_overrides(raw, [(key.split("."), value)]), f"{where}search_space.{key}={value!r}: ")
    return spec


def _spec_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """An error's location as keys of the spec: without the tag of the ``seeds`` form."""
    return (loc[0], *loc[2:]) if loc[:1] == ("seeds",) and len(loc) > 1 and loc[1] in SEEDS_FORMS else loc


def _validate(raw: dict[str, Any], where: str, origins: Origins | None = None) -> ExperimentSpec:
    try:
        spec = ExperimentSpec.model_validate(raw)
        args = spec.model_params()
    except ValidationError as err:
        prefix = [] if err.title == ExperimentSpec.__name__ else ["model_args"]
        key = ".".join([*prefix, *(str(p) for p in _spec_loc(err.errors()[0]["loc"]))])
        raise _error(where, key, _why(err), origins) from None
    loose = _loose_bool(raw, spec.model_dump()) or _loose_bool(raw.get("model_args"), args, ("model_args",))
    if loose:
        raise _error(where, loose[0], f"{loose[1]!r} is not a boolean: write true or false", origins)
    return spec


def with_config(spec: ExperimentSpec, config: dict[str, Any]) -> ExperimentSpec:
    """The spec with a searched configuration (``{"model_args.lr": 1e-4}``) applied."""
    overrides = [(key.split("."), value) for key, value in sorted(config.items())]
    return _validate(apply_overrides(spec.model_dump(mode="json", exclude_unset=True), overrides), "")


def _read_spec(path: Path) -> str:
    """A spec file's text; anything that is not a small UTF-8 file is a one-line error."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise HarnessError(f"spec not found: {path}") from None
    except IsADirectoryError:
        raise HarnessError(f"{path}: a directory, not a spec file") from None
    except OSError as exc:
        raise HarnessError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise HarnessError(f"{path}: larger than {MAX_SPEC_BYTES >> 20} MiB; a spec is a few dozen lines of YAML")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None


def load_spec(path: Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read a YAML spec, apply ``--set`` overrides, validate strictly."""
    text = _read_spec(path)
    try:
        raw = _plain(_load_yaml(text), f"{path}: ")
    except yaml.YAMLError as exc:
        raise HarnessError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise HarnessError(f"{path}: not valid YAML (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: expected a mapping of keys at the top level")
    items = overrides or []
    return validate_spec(apply_overrides(raw, parse_set(items)), str(path), set_origins(items))


def run_spec(
    spec: ExperimentSpec,
    category: str,
    seed: int,
    repeat: int,
    device: Device = "auto",
    *,
    role: Role = "run",
    selection: dict[str, Any] | None = None,
    environment: str | None = None,
    source: str | None = None,
) -> RunSpec:
    """One point of the study's grid (or one HPO trial, scored on the validation split), in
    the named environment of the spec's (None: the one it runs in); of the study varying
    only stream ``source``, if given."""
    variant = (spec.environments or {})[environment] if environment is not None else None
    return RunSpec(
        sweep=spec.name,
        study=spec.study,
        model=spec.model,
        model_args=spec.model_params(),
        data=spec.data,
        category=category,
        seed=seed,
        repeat=repeat,
        deterministic=spec.deterministic,
        resources=spec.resources,
        device=variant.device if variant and variant.device else device,
        environment_name=environment,
        environment=variant,
        role=role,
        validation=spec.validation if role == "trial" else None,
        selection=selection,
        streams=spec.stream_pins(source),
        seeds_plan=spec.adaptive,
    )


def environment_names(spec: ExperimentSpec) -> list[str | None]:
    """The study's environments by name, in the spec's order ([None]: just the one it is in)."""
    return list(spec.environments) if spec.environments else [None]


def expand(
    spec: ExperimentSpec,
    device: Device = "auto",
    *,
    role: Role = "run",
    selection: dict[str, Any] | None = None,
    environments: list[str | None] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[RunSpec]:
    """The study's grid, environments x (the study, then one per source) x categories x seeds
    x repeats, in a fixed order (``seeds``: these instead of ``seed_list``, for an adaptive
    study's later rounds)."""
    return [
        run_spec(spec, category, seed, repeat, device, role=role, selection=selection, environment=env, source=src)
        for env in (environment_names(spec) if environments is None else environments)
        for src in [None, *(spec.sources or [])]
        for category in spec.data.categories
        for seed in (spec.seed_list() if seeds is None else seeds)
        for repeat in range(spec.repeats)
    ]
