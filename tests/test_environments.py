"""Execution environments as a study axis, measured for real on this CPU: ISA dispatch,
oneDNN and threads change the bits of a run, and the checker says where and by how much."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import fingerprint
from harness.errors import HarnessError
from harness.fingerprint import ONEDNN_NEEDS, check_requested, cpu_info
from harness.spec import validate_spec
from harness.store import ResultsStore
from tests.test_sweep import SMOKE, SMOKE_HPO, records, sweep_cli, write_spec

ENVIRONMENTS = {"native": {}, "aten-default": {"aten_cpu_capability": "default"}, "no-onednn": {"onednn": False}}


def check_json(*results: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "harness", "check", *map(str, results), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def spec_doc(**changes: Any) -> dict[str, Any]:
    return {
        "name": "envs",
        "model": "patchcore",
        "data": {"root": "x", "categories": ["disc"]},
        "resources": {"cpu": 2, "gpu": 0},
        **changes,
    }


@pytest.mark.parametrize(
    ("environments", "message"),
    [
        ({"fast": {"isa": "avx2"}}, "environments.fast.isa: unknown key"),
        ({"fast": {"aten_cpu_capability": "avx3"}}, "environments.fast.aten_cpu_capability: Input should be"),
        ({"fast": {"onednn_max_isa": "avx3"}}, "'avx3' is not a oneDNN ISA"),
        ({"fast": {"matmul_precision": "low"}}, "environments.fast.matmul_precision: Input should be"),
        ({"fast": {"autocast": "fp8"}}, "environments.fast.autocast: Input should be"),
        ({"gpu": {"device": "cuda"}}, "environments.gpu.device=cuda needs resources.gpu >= 1 (it is 0)"),
        ({"gpu": {"device": "tpu"}}, "environments.gpu.device: String should match pattern"),
        ({"many": {"threads": 4}}, "environments.many.threads=4 is more than resources.cpu=2"),
        ({"a": {"onednn": False}, "b": {"onednn": False}}, "environments.b: the same settings as environments.a"),
        ({"a b": {}}, "environments.a b: a name of letters, digits"),
        ({}, "environments: Dictionary should have at least 1 item"),
    ],
)
def test_bad_environments_are_one_line_errors(environments: dict[str, Any], message: str) -> None:
    with pytest.raises(HarnessError) as err:
        validate_spec(spec_doc(environments=environments))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_bad_environment_stops_the_sweep_before_ray_and_stores_nothing(tmp_path: Path, synth_root: Path) -> None:
    results = tmp_path / "results"
    kept = results / "smoke" / "runs" / "kept.json"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"kept": true}\n')
    spec = write_spec(tmp_path / "s.yaml", SMOKE, data__root=str(synth_root), environments={"gpu": {"device": "cuda"}})
    out = sweep_cli(spec, results)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "environments.gpu.device=cuda needs resources.gpu >= 1" in out.stderr
    assert [p.name for p in (results / "smoke" / "runs").iterdir()] == ["kept.json"]
    assert kept.read_text() == '{"kept": true}\n'


def _missing_isa() -> str | None:
    """The lowest oneDNN ISA this CPU lacks (None: it has them all)."""
    flags = set(cpu_info()["flags"])
    return next((isa for isa, needs in ONEDNN_NEEDS.items() if not needs <= flags), None)


def test_an_isa_this_cpu_lacks_is_refused_not_silently_lowered() -> None:
    isa = _missing_isa()
    if isa is None:
        pytest.skip("this CPU has every oneDNN ISA")
    with pytest.raises(HarnessError, match=f"onednn_max_isa={isa}: this CPU .* lacks"):
        check_requested({"onednn_max_isa": isa})
    with pytest.raises(HarnessError, match="was asked for, but torch dispatches to"):
        # This process loaded torch without it: ATEN_CPU_CAPABILITY comes too late now.
        check_requested({"aten_cpu_capability": "default"})


def test_the_image_is_recorded_and_its_content_is_part_of_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"threads": 1, "device": "cpu"}
    monkeypatch.delenv(fingerprint.IMAGE_ENV, raising=False)
    outside = fingerprint.environment_id("cpu", settings)
    assert fingerprint.image() is None
    id_file = tmp_path / "image-id"
    monkeypatch.setattr(fingerprint, "IMAGE_ID_FILE", id_file)
    monkeypatch.setenv(fingerprint.IMAGE_ENV, "ad-harness:1")
    monkeypatch.setenv(fingerprint.IMAGE_BASE_ENV, "debian:bookworm")
    assert fingerprint.image() == {"tag": "ad-harness:1", "base": "debian:bookworm", "content_id": None}
    ids = {}
    for content in ("a" * 64, "b" * 64):
        id_file.write_text(content + "\n")
        ids[content] = fingerprint.environment_id("cpu", settings)
        assert fingerprint.image() == {"tag": "ad-harness:1", "base": "debian:bookworm", "content_id": content}
    assert len({outside, *ids.values()}) == 3  # two images' contents: two environments, neither the host's
    monkeypatch.setenv(fingerprint.IMAGE_ENV, "ad-harness:latest")
    assert fingerprint.environment_id("cpu", settings) == ids["b" * 64]  # one content under two tags: one


@pytest.mark.slow
def test_a_lacking_isa_stops_the_sweep_in_the_cluster_with_nothing_stored(
    tmp_path: Path, synth_root: Path, ray_tmp: Path
) -> None:
    isa = _missing_isa()
    if isa is None:
        pytest.skip("this CPU has every oneDNN ISA")
    envs = {"native": {}, "wide": {"onednn_max_isa": isa}}
    spec = write_spec(tmp_path / "s.yaml", SMOKE, data__root=str(synth_root), environments=envs)
    out = sweep_cli(spec, tmp_path / "results")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"harness sweep: error: environments.wide: onednn_max_isa={isa}: this CPU" in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert not list(ResultsStore(tmp_path / "results").paths())


def _by_env(recs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(recs, key=lambda r: (r["seed"], r["repeat"])):
        out.setdefault(r["environment"]["variant"], []).append(r)
    return out


@pytest.mark.slow
def test_three_environments_differ_where_measured_and_repeat_bitwise(
    tmp_path: Path, synth_root: Path, ray_tmp: Path
) -> None:
    """PatchCore, one seed, two repeats, in three environments on this machine."""
    results = tmp_path / "results"
    spec = write_spec(
        tmp_path / "s.yaml",
        SMOKE,
        data__root=str(synth_root),
        data__categories=["disc"],
        seeds=[0],
        environments=ENVIRONMENTS,
    )
    out = sweep_cli(spec, results)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok patchcore disc seed=0 r1 in aten-default" in out.stdout
    by_env = _by_env(records(results))
    assert sorted(by_env) == sorted(ENVIRONMENTS)
    for name, (r0, r1) in by_env.items():
        env = r0["environment"]
        assert env["requested"] == ENVIRONMENTS[name]
        assert r0["predictions"]["scores_sha256"] == r1["predictions"]["scores_sha256"], name  # repeats: bitwise
        assert env["environment_id"] == r1["environment"]["environment_id"]
    native, default, no_onednn = (by_env[n][0] for n in ("native", "aten-default", "no-onednn"))
    assert default["environment"]["torch_build"]["cpu_capability"] == "default"
    assert native["environment"]["torch_build"]["cpu_capability"] != "default"
    assert no_onednn["environment"]["execution"]["onednn"] is False
    assert len({r["environment"]["machine_id"] for r in (native, default, no_onednn)}) == 1  # one machine
    assert len({r["run_id"] for r in (native, default, no_onednn)}) == 3  # another environment, another run
    # Measured: the ISA changes PatchCore's scores for the same seed (in the 7th digit here).
    assert native["predictions"]["scores_sha256"] != default["predictions"]["scores_sha256"]

    doc = check_json(results)
    (group,) = doc["groups"]
    assert group["determinism"] == {**group["determinism"], "verdict": "bitwise", "pairs": 3}
    pairs = {(c["variant_a"], c["variant_b"]): c for c in group["cross_environment"]}
    assert len(pairs) == 3
    cross = pairs[("aten-default", "native")]
    assert cross["verdict"] in ("within_tolerance", "differs")
    assert 0 < cross["scores"]["max_abs"] < 1e-3
    assert cross["same_machine"] is True
    assert "torch_build.cpu_capability" in cross["fingerprint_diff"]
    assert "execution.onednn" in pairs[("aten-default", "no-onednn")]["fingerprint_diff"]

    again = sweep_cli(spec, results)  # each environment's workers find their own runs stored
    assert again.returncode == 0, again.stderr
    assert "0 ok, 0 failed, 0 lost, 6 already stored" in again.stdout


def _harness_run(results: Path, root: Path, env: dict[str, str]) -> None:
    args = ["run", "--model", "patchcore", "--data-root", str(root), "--category", "disc", "--results", str(results)]
    args += ["--set", "model_args.pre_trained=false", "--set", "data.image_size=64", "--set", "resources.cpu=1"]
    for seed in ("0", "1"):
        out = subprocess.run(
            [sys.executable, "-m", "harness", *args, "--seed", seed],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **env},
        )
        assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_check_over_two_stores_names_what_differs_beside_what_moved(tmp_path: Path, synth_root: Path) -> None:
    """The same study made in two environments (as on two machines) into two stores."""
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    _harness_run(a, synth_root, {})
    _harness_run(b, synth_root, {"ATEN_CPU_CAPABILITY": "default"})
    doc = check_json(a, b)
    (group,) = doc["groups"]
    assert group["n_runs"] == 4
    (cross,) = group["cross_environment"]
    assert cross["seeds"] == [0, 1]
    assert "default" in cross["fingerprint_diff"]["torch_build.cpu_capability"]  # unnamed: ordered by id
    assert cross["scores"]["max_abs"] > 0
    text = subprocess.run(
        [sys.executable, "-m", "harness", "check", str(a), str(b)], capture_output=True, text=True, timeout=300
    ).stdout
    assert f"checked {a} and {b}: 4 records" in text
    (line,) = [ln for ln in text.splitlines() if "2 seeds:" in ln]
    assert "max |Δscore|" in line
    assert "Δ image_AUROC" in line
    assert "environment differs in" in line
    assert "torch_build.cpu_capability" in line


@pytest.mark.slow
def test_a_search_per_environment_runs_its_trials_in_that_environment(
    tmp_path: Path, synth_root: Path, ray_tmp: Path
) -> None:
    """Tune starts its own trial workers: a variant torch reads at load reaches them anyway."""
    results = tmp_path / "results"
    envs = {"native": {}, "aten-default": {"aten_cpu_capability": "default"}}
    spec = write_spec(tmp_path / "s.yaml", SMOKE_HPO, data__root=str(synth_root), environments=envs)
    out = sweep_cli(spec, results)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "search disc in aten-default:" in out.stdout
    recs = records(results)
    trials = [r for r in recs if r["role"] == "trial"]
    for r in trials:
        in_default = r["environment"]["variant"] == "aten-default"
        assert (r["environment"]["torch_build"]["cpu_capability"] == "default") == in_default
    assert len({r["run_id"] for r in trials}) == len(trials)
    doc = check_json(results)
    searches = [s for s in doc["searches"] if s["category"] == "disc"]
    assert sorted(s["variant"] for s in searches) == ["aten-default", "native"]
    (winners,) = doc["across_environments"]["search_winners"]
    assert {w["variant"] for w in winners["winners"]} == {"native", "aten-default"}
    again = sweep_cli(spec, results)  # resumes: trials of both environments are found stored
    assert again.returncode == 0, again.stderr
    assert " 0 ok, 0 failed, 0 lost," in again.stdout


@pytest.mark.slow
def test_a_search_is_reproducible_under_load(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    """The demo's search on one category twice, the second time beside a process that keeps a
    core busy: the same trials, curves, selection and hashes."""
    from harness.demo import spec_paths

    (demo_search,) = [p for p in spec_paths() if p.name == "ganomaly.yaml"]
    spec = write_spec(
        tmp_path / "s.yaml", demo_search, data__root=str(synth_root), data__categories=["disc"], repeats=1, seeds=[0]
    )
    quiet = sweep_cli(spec, tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = sweep_cli(spec, tmp_path / "loaded")
    finally:
        busy.kill()
        busy.wait()
    assert loaded.returncode == 0, loaded.stderr

    def outcome(results: Path) -> dict[str, Any]:
        out = {}
        for r in records(results):
            validation = r["validation"] and r["validation"]["curve"]
            hashes = r["predictions"] and {k: v for k, v in r["predictions"].items() if k.endswith("sha256")}
            out[r["run_id"]] = (r["role"], r["metrics"], validation, hashes, r["selection"])
        return out

    first, second = outcome(tmp_path / "quiet"), outcome(tmp_path / "loaded")
    assert len(first) == 5  # 4 trials, then the winner's one run
    assert first == second
