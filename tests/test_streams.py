"""Named random streams: a pinned stream draws the same whatever the seed, the others follow it,
and a run with nothing pinned is the run it was before streams existed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import FAST_ARGS

from harness.errors import HarnessError
from harness.run import run_one
from harness.spec import expand, run_spec, validate_spec
from harness.streams import Streams, derived


def _spec(model: str, root: Path, **extra: Any) -> Any:
    raw = {
        "name": "streams",
        "model": model,
        "model_args": FAST_ARGS[model],
        "data": {
            "root": str(root),
            "categories": ["disc"],
            "image_size": 64,
            "train_batch_size": 8,
            "eval_batch_size": 8,
        },
        "seeds": [0, 1],
        **extra,
    }
    return validate_spec(raw)


def _scores(model: str, root: Path, seed: int, pins: dict[str, int | str]) -> tuple[str, str]:
    record = run_one(run_spec(_spec(model, root, streams=pins), "disc", seed, 0, "cpu"))
    assert record.ok, record.error
    assert record.predictions is not None
    return record.predictions.scores_sha256, record.predictions.model_sha256


@pytest.mark.parametrize(("model", "varied"), [("patchcore", "sampling"), ("patchcore", "init"), ("ganomaly", "order")])
def test_a_runs_numbers_depend_only_on_its_streams_seeds(model: str, varied: str, synth_root: Path) -> None:
    """Seed 0 with ``varied`` following it equals seed 7 with ``varied`` pinned to 0; seed 1
    (``varied`` now draws from 1) differs: every draw of the run comes from a named stream."""
    pinned = {name: 5 for name in ("init", "order", "sampling") if name != varied}
    if model == "ganomaly":
        pinned.pop("sampling", None)
    at_zero = _scores(model, synth_root, 0, {**pinned, varied: "seed"})
    assert _scores(model, synth_root, 7, {**pinned, varied: 0}) == at_zero
    assert _scores(model, synth_root, 1, {**pinned, varied: "seed"})[0] != at_zero[0]


def test_nothing_pinned_keeps_one_sequence_and_the_run_id(synth_root: Path) -> None:
    spec = _spec("patchcore", synth_root)
    run = run_spec(spec, "disc", 3, 0, "cpu")
    assert run.streams is None
    assert "streams" not in run.params()
    assert "streams" not in run.key()["params"]
    streams = run.random_streams()
    assert streams == Streams({"init": 3, "order": 3, "sampling": 3}, separate=False)
    assert streams.generator("order") is None
    pinned = run_spec(_spec("patchcore", synth_root, streams={"init": 3}), "disc", 3, 0, "cpu")
    assert pinned.params()["streams"] == {"init": 3}
    assert pinned.key() != run.key()
    assert pinned.random_streams().separate


def test_a_trial_draws_its_split_from_a_fixed_seed_unless_pinned(synth_root: Path) -> None:
    space = {"model_args.lr": {"type": "choice", "values": [0.001]}}
    trial = run_spec(_spec("ganomaly", synth_root, study="hpo", search_space=space), "disc", 4, 0, "cpu", role="trial")
    assert trial.random_streams().seeds == {"init": 4, "order": 4, "split": 0}
    pinned = _spec("ganomaly", synth_root, study="hpo", search_space=space, streams={"split": "seed"})
    assert run_spec(pinned, "disc", 4, 0, "cpu", role="trial").random_streams().seeds["split"] == 4


def test_the_record_says_each_streams_seed(synth_root: Path) -> None:
    record = run_one(run_spec(_spec("patchcore", synth_root, streams={"init": 9}), "disc", 1, 0, "cpu"))
    assert record.streams == {"init": 9, "order": 1, "sampling": 1}
    assert record.params["streams"] == {"init": 9}


def test_sources_expand_one_study_per_stream_with_the_others_pinned(synth_root: Path) -> None:
    spec = _spec("patchcore", synth_root, seeds=[4, 5, 6], sources=["sampling", "init"], streams={"order": 2})
    runs = expand(spec, "cpu")
    assert len(runs) == 3 * 3
    pins = [r.streams for r in runs[::3]]
    assert pins == [
        {"order": 2},
        {"init": 4, "order": 2, "sampling": "seed"},
        {"init": "seed", "order": 2, "sampling": 4},
    ]
    assert len({r.key()["params"]["streams"].__repr__() for r in runs[3:]}) == 2
    assert runs[3].random_streams().seeds == {"init": 4, "order": 2, "sampling": 4}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"streams": {"sampling": 1}}, "streams.sampling: not one ganomaly draws from"),
        ({"streams": {"split": 1}}, "streams.split: a search trial's only"),
        ({"streams": {"init": -1}}, "streams.init"),
        ({"sources": ["sampling"]}, "sources: sampling is not a stream ganomaly draws from"),
        ({"sources": ["init", "init"]}, "sources: a stream is listed twice"),
        (
            {"sources": ["init"], "seeds": {"adaptive": {"ci_halfwidth": 0.01, "min": 3, "max": 9}}},
            "sources: not with adaptive seeds",
        ),
    ],
)
def test_bad_streams_are_one_line_errors(extra: dict[str, Any], message: str, synth_root: Path) -> None:
    with pytest.raises(HarnessError, match=message):
        _spec("ganomaly", synth_root, **extra)


def test_streams_are_derived_apart() -> None:
    assert len({derived(name, 0) for name in ("init", "order", "sampling")}) == 3
    assert derived("init", 0) != derived("init", 1)
