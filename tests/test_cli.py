"""The CLI as users call it: a real process, one-line errors, nothing stored on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.run import run_one
from tests.conftest import make_run_spec

SMALL = [
    "--set",
    "data.image_size=64",
    "--set",
    "data.train_batch_size=8",
    "--set",
    "data.eval_batch_size=8",
    "--set",
    "name=test",
]


def harness(*args: str | Path, hub_cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if hub_cache:
        env["HF_HUB_CACHE"] = str(hub_cache)
    return subprocess.run(
        [sys.executable, "-m", "harness", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def run_disc(
    model: str, root: Path, results: Path, *extra: str, hub_cache: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`harness run` on the `disc` category at test size, with extra flags and --set items."""
    args = ["run", "--model", model, "--data-root", root, "--category", "disc", *SMALL, *extra, "--results", results]
    return harness(*args, hub_cache=hub_cache)


@pytest.mark.parametrize("command", [[], ["data", "synth"], ["run"], ["sweep"], ["check"], ["report"], ["demo"]])
def test_help_has_an_example(command: list[str]) -> None:
    out = harness(*command, "--help")
    assert out.returncode == 0
    assert "example:\n  harness" in out.stdout


def test_synth_prints_a_summary(tmp_path: Path) -> None:
    out = harness("data", "synth", tmp_path / "d", "--categories", "grid", "--n-train", "4", "--n-test", "6")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"wrote 1 categories (grid) to {tmp_path / 'd'}: 4 train, 2 good + 4 defective test images each"
    )
    assert len(list((tmp_path / "d" / "grid").rglob("*.png"))) == 4 + 6 + 4


def _corrupt_image(root: Path) -> None:
    (root / "disc" / "test" / "hole" / "000.png").write_bytes(b"not an image")


def _empty_train(root: Path) -> None:
    shutil.rmtree(root / "disc" / "train" / "good")
    (root / "disc" / "train" / "good").mkdir()


def _mask_without_image(root: Path) -> None:
    (root / "disc" / "test" / "stain" / "001.png").unlink()


BAD_INPUTS = [
    ("missing root", ["--data-root", "{tmp}/nowhere", "--category", "disc"], None, "data root"),
    ("unknown category", ["--category", "bottle"], None, "category 'bottle' not found"),
    ("unknown model", ["--category", "disc", "--model", "padim"], None, "unknown model 'padim'"),
    ("malformed set", ["--category", "disc", "--set", "data.image_size"], None, "expected key=value"),
    ("unknown set key", ["--category", "disc", "--set", "data.img_size=64"], None, "data.img_size: unknown key"),
    ("flag key in set", ["--category", "disc", "--set", "seeds=[1]"], None, "use --seed"),
    ("not an image", ["--category", "disc"], _corrupt_image, "000.png: not a readable image"),
    ("empty train dir", ["--category", "disc"], _empty_train, "no training images"),
    ("mask without image", ["--category", "disc"], _mask_without_image, "001_mask.png: mask without an image"),
    ("no such device", ["--category", "disc", "--device", "cuda"], None, "no CUDA device is visible"),
    (
        "pretrained offline",
        ["--category", "disc", "--set", "model_args.pre_trained=true"],
        None,
        "model_args.pre_trained=false",
    ),
]


@pytest.mark.parametrize(("case", "args", "damage", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_stores_nothing(
    own_root: Path, tmp_path: Path, case: str, args: list[str], damage: object, message: str
) -> None:
    if callable(damage):
        damage(own_root)
    results = tmp_path / "results"
    kept = results / "test" / "runs" / "kept.json"
    kept.parent.mkdir(parents=True)
    kept.write_text('{"kept": true}\n')
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    model = [] if "--model" in args else ["--model", "patchcore"]
    root = [] if "--data-root" in args else ["--data-root", str(own_root)]
    # Later --set wins: a case's own args come after the test-size defaults.
    defaults = [*SMALL, "--set", "model_args.pre_trained=false"]
    # An empty hub cache: the pretrained case must fail whatever this machine has cached.
    out = harness("run", *model, *root, *defaults, *args, "--results", results, hub_cache=tmp_path / "hub")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("harness run: error: ")
    assert message in lines[0]
    assert sorted(p.relative_to(results).as_posix() for p in results.rglob("*")) == [
        "test",
        "test/runs",
        "test/runs/kept.json",
    ]
    assert kept.read_text() == '{"kept": true}\n'


def test_unwritable_results_fail_before_the_run(own_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results directory should be")
    out = run_disc("patchcore", own_root, blocker / "sub")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"harness run: error: results directory {blocker / 'sub'} cannot be written "
        f"({blocker} is not a writable directory)"
    )


def test_synth_into_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    out = harness("data", "synth", tmp_path / "f" / "x")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "Not a directory" in out.stderr


def test_argparse_errors_are_one_line_too() -> None:
    out = harness("run", "--model", "patchcore")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "required" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", ["patchcore", "ganomaly"])
def test_run_cli_equals_the_library_call(model: str, synth_root: Path, tmp_path: Path) -> None:
    """Two entry points, one answer: the CLI's record matches an in-process run bit for bit."""
    extra = {
        "patchcore": ["model_args.pre_trained=false"],
        "ganomaly": ["model_args.max_epochs=2", "model_args.n_features=16", "model_args.latent_vec_size=16"],
    }
    sets = [x for s in extra[model] for x in ("--set", s)]
    out = run_disc(model, synth_root, tmp_path / "r", "--seed", "3", *sets)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"{model} disc seed=3 r0: image_AUROC=")
    assert "\n" not in line
    path = Path(line.rsplit(" -> ", 1)[1])
    doc = json.loads(path.read_text())
    assert path.parent == tmp_path / "r" / "test" / "runs"
    assert doc["status"] == "ok"
    assert doc["seed"] == 3
    local = run_one(make_run_spec(model, synth_root, seed=3))
    assert local.run_id == doc["run_id"]
    assert local.predictions
    assert local.predictions.scores_sha256 == doc["predictions"]["scores_sha256"]
    assert local.metrics == doc["metrics"]


@pytest.mark.slow
def test_failed_run_exits_1_and_is_stored(synth_root: Path, tmp_path: Path) -> None:
    out = run_disc(
        "patchcore",
        synth_root,
        tmp_path,
        "--set",
        "model_args.pre_trained=false",
        "--set",
        "model_args.coreset_sampling_ratio=0.0001",
    )
    assert out.returncode == 1
    assert out.stdout.startswith("FAILED patchcore disc seed=0 r0: ValueError: coreset_size")
    (record,) = tmp_path.glob("test/runs/*.json")
    assert json.loads(record.read_text())["status"] == "failed"


@pytest.mark.slow
def test_pretrained_weights_come_from_the_local_hub_cache(synth_root: Path, tmp_path: Path) -> None:
    """An air-gapped node with a pre-filled Hugging Face cache runs `pre_trained: true` offline."""
    import timm
    import torch
    from safetensors.torch import save_file

    from harness.hashing import sha256_file

    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(11)  # stand-in weights: the real ones cannot be fetched here
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(snapshot / "model.safetensors"))
    out = run_disc("patchcore", synth_root, tmp_path / "r", hub_cache=tmp_path / "hub")
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", "no progress bars or banners on a successful run"
    (path,) = (tmp_path / "r").glob("test/runs/*.json")
    args = json.loads(path.read_text())["params"]["model_args"]
    assert args["pre_trained"] is True
    assert args["weights_sha256"] == sha256_file(str(snapshot / "model.safetensors"))
