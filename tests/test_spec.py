from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.run import make_run_id
from harness.spec import apply_overrides, expand, load_spec, parse_set, run_spec, validate_spec, with_config

BASE = {"model": "patchcore", "data": {"root": "/data", "categories": ["bottle", "screw"]}}


def test_defaults_are_a_real_mvtec_study() -> None:
    spec = validate_spec(BASE)
    args = spec.model_params()
    assert args["pre_trained"] is True
    assert args["layers"] == ["layer2", "layer3"]
    assert args["coreset_sampling_ratio"] == 0.1
    assert spec.data.image_size == 256


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"colour": 1}, "colour: unknown key"),
        ({"data": {**BASE["data"], "imagesize": 64}}, "data.imagesize: unknown key"),
        ({"model_args": {"coreset_ratio": 0.1}}, "model_args.coreset_ratio: unknown key"),
        ({"model_args": {"coreset_sampling_ratio": 1.5}}, "model_args.coreset_sampling_ratio: Input should be less"),
        ({"model": "padim"}, "unknown model 'padim'; known: ganomaly, patchcore"),
        ({"seeds": [1, 1]}, "seeds: seeds repeat"),
        ({"data": {**BASE["data"], "image_size": "big"}}, "data.image_size: Input should be a valid integer"),
        ({"model_args": {"pre_trained": False, "weights": "/w.pth"}}, "model_args: weights is a pretrained backbone"),
        ({"repeats": 0}, "repeats: Input should be greater than or equal to 1"),
    ],
)
def test_bad_specs_name_the_key(override: dict, message: str) -> None:
    with pytest.raises(HarnessError) as err:
        validate_spec({**BASE, **override})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_set_parses_yaml_scalars_and_dotted_keys() -> None:
    parsed = parse_set(["model_args.pre_trained=false", "data.image_size=64", "seeds=[1, 2]", "name=x"])
    doc = apply_overrides(BASE, parsed)
    spec = validate_spec(doc)
    assert spec.model_params()["pre_trained"] is False
    assert spec.data.image_size == 64
    assert spec.seeds == [1, 2]
    assert spec.name == "x"
    assert BASE["data"].get("image_size") is None, "overrides must not change the input"


@pytest.mark.parametrize("item", ["noequals", "=5", "a..b=1", "data.image_size=[1"])
def test_malformed_set(item: str) -> None:
    with pytest.raises(HarnessError, match="--set"):
        parse_set([item])


def test_set_into_a_scalar_is_an_error() -> None:
    with pytest.raises(HarnessError, match="model is not a mapping"):
        apply_overrides(BASE, parse_set(["model.x=1"]))


def test_expand_is_categories_by_seeds_by_repeats() -> None:
    spec = validate_spec({**BASE, "seeds": [3, 4], "repeats": 2})
    runs = expand(spec)
    assert [(r.category, r.seed, r.repeat) for r in runs] == [
        (c, s, r) for c in ("bottle", "screw") for s in (3, 4) for r in (0, 1)
    ]


def test_run_id_is_stable_and_separates_what_differs() -> None:
    a, b = expand(validate_spec({**BASE, "seeds": [0], "repeats": 2}))[:2]
    assert make_run_id(a, "hw1") == make_run_id(a.model_copy(), "hw1")
    assert len({make_run_id(a, "hw1"), make_run_id(b, "hw1"), make_run_id(a, "hw2")}) == 3
    other_data = validate_spec({**BASE, "data": {**BASE["data"], "root": "/elsewhere"}})
    assert make_run_id(expand(other_data)[0], "hw1") != make_run_id(a, "hw1"), "other data is another run"
    assert expand(other_data)[0].params() == a.params(), "but the same settings, for the checker's groups"


def test_params_hold_no_paths() -> None:
    weights = [expand(validate_spec({**BASE, "model_args": {"weights": f"{d}/r18.pth"}}))[0] for d in ("/a", "/b")]
    assert weights[0].params() == weights[1].params()
    assert weights[0].params()["model_args"]["weights"] == "r18.pth"
    assert "root" not in weights[0].params()["data"]
    hub = expand(validate_spec(BASE))[0]
    assert make_run_id(hub, "hw") != make_run_id(weights[0], "hw"), "a weights file is another run than the hub"
    assert make_run_id(weights[0], "hw") != make_run_id(weights[1], "hw"), "and another file another run"


def test_load_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("model: ganomaly\ndata: {root: /d, categories: [a]}\nmodel_args: {max_epochs: 3}\n")
    spec = load_spec(path, ["model_args.lr=0.001"])
    assert spec.model_params()["lr"] == 0.001
    assert spec.model_params()["max_epochs"] == 3
    path.write_text("model: [unclosed\n")
    with pytest.raises(HarnessError, match="not valid YAML"):
        load_spec(path)
    with pytest.raises(HarnessError, match="spec not found"):
        load_spec(tmp_path / "missing.yaml")


HPO = {
    **BASE,
    "model": "ganomaly",
    "study": "hpo",
    "search_space": {
        "model_args.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        "model_args.n_features": {"type": "choice", "values": [16, 32]},
        "data.train_batch_size": {"type": "randint", "low": 4, "high": 9},
    },
}


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "experiments").glob("*.yaml")))
def test_shipped_specs_load_and_say_what_they_reach(path: Path) -> None:
    spec = load_spec(path)
    assert "Reaches:" in path.read_text()
    assert expand(spec)


def test_the_mvtec_studies_are_full_size() -> None:
    root = Path(__file__).parent.parent / "experiments"
    seeds = load_spec(root / "patchcore_seeds.yaml")
    assert len(expand(seeds)) == 15 * 5 * 2
    hpo = load_spec(root / "ganomaly_hpo.yaml")
    assert {"model_args.lr", "model_args.latent_vec_size", "model_args.n_features", "model_args.wcon"} <= set(
        hpo.search_space or {}
    )
    assert {"data.train_batch_size", "model_args.max_epochs"} <= set(hpo.search_space or {})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"search_space": {}}, "search_space: study: hpo needs at least one dimension"),
        ({"search_space": {"model_args.lr": {"type": "loguniform", "low": 0, "high": 1}}}, "loguniform needs low > 0"),
        ({"search_space": {"model_args.lr": {"type": "uniform", "low": 2, "high": 1}}}, "low (2.0) must be below"),
        ({"search_space": {"model_args.lr": {"type": "choice", "values": []}}}, "search_space.model_args.lr.values"),
        (
            {"search_space": {"model_args.lr": {"type": "normal", "low": 0, "high": 1}}},
            "search_space.model_args.lr.type",
        ),
        ({"search_space": {"seeds": {"type": "choice", "values": [1]}}}, "search_space.seeds: not searchable"),
        ({"search_space": {"model_args.lrate": {"type": "choice", "values": [1]}}}, "model_args.lrate: unknown key"),
        (
            {"search_space": {"model_args.n_features": {"type": "randint", "low": 0, "high": 4}}},
            "search_space.model_args.n_features=0: model_args.n_features: Input should be greater",
        ),
        ({"search": "bayes"}, "search: Input should be 'random', 'optuna' or 'hyperopt'"),
        ({"scheduler": {"name": "asha", "grace": 2}}, "scheduler.grace: unknown key"),
        ({"validation": {"split": "synthetic", "ratio": 1.0}}, "validation.ratio: Input should be less than 1"),
        ({"metric": "image_AUROC"}, "metric: Input should be 'val_image_AUROC'"),
    ],
)
def test_bad_hpo_specs_name_the_key(override: dict, message: str) -> None:
    with pytest.raises(HarnessError) as err:
        validate_spec({**HPO, **override}, "hpo.yaml")
    assert str(err.value).startswith("hpo.yaml: ")
    assert message in str(err.value)


def test_hpo_keys_belong_to_hpo_studies() -> None:
    with pytest.raises(HarnessError, match="num_samples: only for study: hpo"):
        validate_spec({**BASE, "num_samples": 4})


def test_a_searched_config_is_applied_to_the_run() -> None:
    from harness.sweep.worker import trial_spec

    spec = validate_spec(HPO)
    best = with_config(spec, {"model_args.lr": 1e-4, "data.train_batch_size": 6})
    assert best.model_args["lr"] == 1e-4
    assert best.data.train_batch_size == 6
    assert best.search_space == spec.search_space

    base = run_spec(spec, "bottle", 0, 0, role="trial")
    trial = trial_spec(base, {"model_args.lr": 3e-4, "model_args.n_features": 16})
    assert trial.model_args["lr"] == 3e-4
    assert trial.model_args["n_features"] == 16
    assert trial.validation is not None
    assert trial.params()["validation"] == {"split": "synthetic", "ratio": 0.5}
    assert trial.selection == {"config": {"model_args.lr": 3e-4, "model_args.n_features": 16}}
    # Trials differ from each other and from the test runs by what defines them.
    other = trial_spec(base, {"model_args.lr": 2e-4, "model_args.n_features": 16})
    assert make_run_id(trial, "hw") != make_run_id(other, "hw")
    tested = run_spec(with_config(spec, {"model_args.lr": 3e-4}), "bottle", 0, 0, role="best")
    assert make_run_id(trial, "hw") != make_run_id(tested, "hw")
    # Under another scheduler the same config is another trial (its curve may end elsewhere).
    fifo = trial_spec(run_spec(spec, "bottle", 0, 0, role="trial", selection={"scheduler": {"name": "fifo"}}), {})
    asha = trial_spec(run_spec(spec, "bottle", 0, 0, role="trial", selection={"scheduler": {"name": "asha"}}), {})
    assert make_run_id(fifo, "hw") != make_run_id(asha, "hw")
    # A best-config run chosen by another rule or trial is another run.
    chosen = [
        run_spec(spec, "bottle", 0, 0, role="best", selection={"metric": m, "mode": "max", "trial_run_id": t})
        for m, t in (("val_image_AUROC", "a"), ("val_image_F1Max", "a"), ("val_image_AUROC", "b"))
    ]
    assert len({make_run_id(c, "hw") for c in chosen}) == 3
