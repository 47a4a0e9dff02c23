"""The stability report: a pinned layout, same store same bytes, references, plots, a real sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from harness.check import check
from harness.cli import execute_run, main
from harness.report import CACHE_FILES, MVTEC_TEST_IMAGES, write_report
from harness.report.plots import Plot, draw, draw_all
from harness.report.sections import StabilityReport
from tests.recordkit import GPU_ENV, VALIDATION, make_record, write_records

GOLDEN = Path(__file__).parent / "golden" / "report.md"
PNG = b"\x89PNG\r\n\x1a\n"


def fixed_store(root: Path) -> Path:
    """Two models on two categories, repeats, a failed run, other hardware, a search: every section."""
    records = []
    for seed, pc in enumerate([0.91, 0.93, 0.92, 0.95]):
        for category, shift in (("disc", 0.0), ("weave", -0.1)):
            records.append(
                make_record(sweep="seeds", category=category, seed=seed, metrics={"image_AUROC": pc + shift})
            )
            records.append(
                make_record(sweep="seeds", category=category, seed=seed, repeat=1, metrics={"image_AUROC": pc + shift})
            )
    records.append(make_record(sweep="seeds", seed=4, status="failed"))
    records += [
        make_record(sweep="seeds", seed=s, env=GPU_ENV, metrics={"image_AUROC": v}) for s, v in [(0, 0.915), (1, 0.93)]
    ]
    trials = []
    for i, val in enumerate([0.6, 0.7, 0.4]):
        t = make_record(sweep="hpo", model="ganomaly", study="hpo", role="trial", repeat=i)
        t.update(metrics={"val_image_AUROC": val}, predictions=None)
        curve = [{"epoch": 1, "val_image_AUROC": 0.5}, {"epoch": 2, "val_image_AUROC": val}]
        t["validation"] = {**VALIDATION, "curve": curve}
        trials.append(t)
    selection = {"metric": "val_image_AUROC", "mode": "max", "value": 0.7, "trial_run_id": trials[1]["run_id"]}
    selection |= {"config": {"model_args.lr": 0.001}, "rule": "max of last-epoch val_image_AUROC among finished trials"}
    records += trials
    chosen = json.loads(json.dumps(trials[1]["params"]))
    chosen["model_args"]["lr"] = 0.001
    best = {
        "sweep": "hpo",
        "model": "ganomaly",
        "study": "hpo",
        "role": "best",
        "selection": selection,
        "params": chosen,
    }
    records += [make_record(seed=s, metrics={"image_AUROC": v}, **best) for s, v in enumerate([0.52, 0.61, 0.47, 0.58])]
    return write_records(root, records)


def test_the_report_layout_is_pinned(tmp_path: Path) -> None:
    """Golden file: regenerate with UPDATE_GOLDEN=1 after a deliberate layout change, and review the diff."""
    out, plots = write_report(
        check(fixed_store(tmp_path / "results")), tmp_path / "r" / "fixed.md", "harness report results"
    )
    text = out.read_text()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    names = ["environments-score-diff.png", "profile-categories.png", "search-hpo-ganomaly.png"]
    names += ["seeds-image_AUROC.png", "seeds-pixel_AUROC.png"]
    assert [p.name for p in plots] == names


def test_same_store_same_bytes_and_stale_plots_go(tmp_path: Path) -> None:
    root = fixed_store(tmp_path / "results")
    first = tmp_path / "a" / "x.md"
    write_report(check(root), first, "harness report results")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    (tmp_path / "a" / "x" / "seeds-old_metric.png").write_bytes(PNG)  # from an earlier report
    (tmp_path / "a" / "x" / "notes.png").write_bytes(PNG)  # not ours: kept
    write_report(check(root), first, "harness report results")
    after = {p.name: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k != "notes.png"} == before
    assert "notes.png" in after


def test_plots_are_valid_pngs_with_a_panel_per_category(tmp_path: Path) -> None:
    _, plots = write_report(check(fixed_store(tmp_path / "results")), tmp_path / "r.md", "harness report results")
    for p in plots:
        assert p.read_bytes().startswith(PNG)
        with Image.open(p) as im:
            im.verify()
    with Image.open(tmp_path / "r" / "seeds-image_AUROC.png") as im:
        assert im.size[0] > im.size[1]  # two panels side by side: disc and weave


def test_published_numbers_appear_only_for_mvtec_sized_categories(tmp_path: Path) -> None:
    bottle = [
        make_record(category="bottle", seed=s, metrics={"image_AUROC": v}, n_test=MVTEC_TEST_IMAGES["bottle"])
        for s, v in enumerate([0.99, 1.0, 0.995])
    ]
    grid = [make_record(category="grid", seed=s, metrics={"image_AUROC": 0.9}) for s in range(3)]  # a synthetic "grid"
    write_records(tmp_path / "results", bottle + grid)
    out, _ = write_report(check(tmp_path / "results"), tmp_path / "r.md", "harness report results")
    section = out.read_text().split("## Published numbers beside ours")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| s1/")]
    assert rows == [
        "| s1/patchcore | bottle | image_AUROC | 0.995 [0.990, 0.998] | 1.000 | no, above | "
        "anomalib PatchCore README (ResNet-18, seed 42, one run) |",
        "| s1/patchcore | bottle | pixel_AUROC | 0.950 [0.950, 0.950] | 0.981 | no, above | "
        "anomalib PatchCore README (ResNet-18, seed 42, one run) |",
    ]


def test_report_cli_default_name_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed_store(tmp_path / "results")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "results"]) == 0
    assert capsys.readouterr().out == "wrote reports/results.md (3 groups, 5 plots in reports/results)\n"
    assert "Built by `harness report results` from 26 records." in (tmp_path / "reports" / "results.md").read_text()


def table_rows(md: str, section: str) -> list[list[str]]:
    body = md.split(f"## {section}")[1].split("\n## ")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("| ")][1:]


@pytest.mark.slow
def test_a_real_harness_run_loop_checks_and_reports(synth_root: Path, tmp_path: Path) -> None:
    """Real PatchCore and GANomaly runs (3 seeds, PatchCore repeated), then `check` and `report` as processes."""
    results = tmp_path / "results"
    common = ["data.image_size=64", "data.train_batch_size=8", "data.eval_batch_size=8", "name=tiny", "resources.cpu=1"]
    models: dict[str, list[str]] = {
        "patchcore": ["model_args.pre_trained=false"],
        "ganomaly": ["model_args.max_epochs=2", "model_args.n_features=16", "model_args.latent_vec_size=16"],
    }
    for model, extra in models.items():
        for seed in range(3):
            for repeat in range(2 if model == "patchcore" else 1):
                record, _ = execute_run(model, str(synth_root), "disc", seed, repeat, common + extra, results, "cpu")
                assert record.status == "ok", record.error
    env = {**os.environ}
    out = subprocess.run(
        [sys.executable, "-m", "harness", "check", str(results), "--json", "--strict"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    by_model = {g["model"]: g for g in doc["groups"]}
    assert by_model["patchcore"]["determinism"]["verdict"] == "bitwise"  # CPU, deterministic: equal hashes
    assert by_model["patchcore"]["determinism"]["pairs"] == 3
    assert by_model["ganomaly"]["determinism"]["verdict"] == "untested"
    for model in models:
        auroc = by_model[model]["metrics"]["image_AUROC"]
        assert auroc["n"] == 3
        assert auroc["min"] <= auroc["mean"] <= auroc["max"]
    pc_auroc = by_model["patchcore"]["metrics"]["image_AUROC"]
    stored = [json.loads(p.read_text()) for p in results.glob("tiny/runs/*.json")]
    pc = sorted(r["metrics"]["image_AUROC"] for r in stored if r["model"] == "patchcore" and r["repeat"] == 0)
    assert (pc_auroc["min"], pc_auroc["max"]) == (pc[0], pc[-1])
    (cmp,) = doc["comparisons"]
    assert {cmp["a"], cmp["b"]} == {"tiny/patchcore", "tiny/ganomaly"}

    out = subprocess.run(
        [sys.executable, "-m", "harness", "report", str(results), "--out", str(tmp_path / "reports" / "tiny.md")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "reports" / "tiny.md").read_text()
    rows = table_rows(md, "Stability over seeds")
    assert [(r[0], r[1], r[2]) for r in rows] == [("tiny/ganomaly", "disc", "3"), ("tiny/patchcore", "disc", "3")]
    pc_row = rows[1]
    assert pc_row[3] == f"{pc_auroc['mean']:.3f} ± {pc_auroc['std']:.3f}"
    assert pc_row[11] == "bitwise (3/3 pairs bitwise)"
    for name in ("seeds-image_AUROC.png", "seeds-pixel_AUROC.png"):
        png = tmp_path / "reports" / "tiny" / name
        assert png.read_bytes().startswith(PNG)
        with Image.open(png) as im:
            im.verify()
    # The reproduce command of the report rebuilds a stored run: the same id and the same scores.
    block = md.split("```bash\n")[1].split("```")[0]
    loop = next(part for part in block.split("done; done; done") if "--model patchcore" in part)
    command = loop.split("do\n", 1)[1].strip().replace("$c", "disc").replace("$s", "0").replace("$r", "0")
    rerun = tmp_path / "rerun"
    command = command.replace("harness run", f"{sys.executable} -m harness run --results {rerun}", 1)
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    (again,) = [json.loads(p.read_text()) for p in rerun.glob("tiny/runs/*.json")]
    (stored_run,) = [r for r in stored if r["run_id"] == again["run_id"]]
    assert again["predictions"]["scores_sha256"] == stored_run["predictions"]["scores_sha256"]


def test_a_metric_missing_for_some_seeds_keeps_the_mean_row_honest(tmp_path: Path) -> None:
    records = [make_record(category=c, seed=s) for c in ("disc", "weave") for s in range(3)]
    records[1]["metrics"]["pixel_AUROC"] = None  # disc seed 1 has no pixel AUROC
    write_records(tmp_path / "results", records)
    out, _ = write_report(check(tmp_path / "results"), tmp_path / "r.md", "harness report results")
    mean_row = next(r for r in table_rows(out.read_text(), "Stability over seeds") if r[1] == "**mean of 2**")
    assert mean_row[2] == "3"
    assert mean_row[7] == "0.950 ± 0.000"  # pixel AUROC over the two seeds both categories have


def test_report_out_must_be_markdown_and_nothing_is_written_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixed_store(tmp_path / "results")
    assert main(["report", str(tmp_path / "results"), "--out", str(tmp_path / "reports" / "x")]) == 2
    assert "name a .md file" in capsys.readouterr().err
    assert not (tmp_path / "reports").exists()


def test_all_fifteen_categories_get_a_mean_beside_the_published_means(tmp_path: Path) -> None:
    records = [
        make_record(category=c, seed=s, metrics={"image_AUROC": 0.96 + 0.01 * s}, n_test=n)
        for c, n in MVTEC_TEST_IMAGES.items()
        for s in range(3)
    ]
    write_records(tmp_path / "results", records)
    out, _ = write_report(check(tmp_path / "results"), tmp_path / "r.md", "harness report results")
    rows = table_rows(out.read_text(), "Published numbers beside ours")
    means = {(r[2], r[6]): r[3:6] for r in rows if r[1] == "mean"}
    assert means[("image_AUROC", "anomalib PatchCore README (ResNet-18, seed 42, one run)")] == [
        "0.970 [0.960, 0.980]",
        "0.973",
        "yes",
    ]
    paper = means[("image_AUROC", "PatchCore paper, Roth et al. CVPR 2022 (WideResNet-50, 10% coreset)")]
    assert paper == ["0.970 [0.960, 0.980]", "0.990", "n/a: wide_resnet50_2 vs our resnet18"]
    assert len([r for r in rows if r[2] == "image_AUROC" and r[1] != "mean"]) == 15


def test_the_reproduce_loop_quotes_category_names(tmp_path: Path) -> None:
    """A category is one directory name, and such a name may hold spaces or a `$`."""
    records = [make_record(category=c, seed=s) for c in ("disc", "my part $1") for s in range(2)]
    write_records(tmp_path / "results", records)
    out, _ = write_report(check(tmp_path / "results"), tmp_path / "r.md", "harness report results")
    block = out.read_text().split("```bash\n")[1].split("```")[0]
    loop = next(line for line in block.splitlines() if line.startswith("for c in"))
    assert loop.startswith("for c in disc 'my part $1'; do")
    assert '--category "$c"' in block


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Plot]:
    """The plots ``write_report`` draws, drawn in this process (so each is seen) as it would."""
    seen: list[Plot] = []

    def draw_here(plots: list[Plot], workers: int | None = None) -> list[bytes]:
        seen.extend(plots)
        return draw_all(plots, workers=1)

    monkeypatch.setattr("harness.report.draw_all", draw_here)
    return seen


def report_pngs(root: Path, out: Path, cache: Path | None = None) -> dict[str, bytes]:
    _, plots = write_report(check(root), out, "harness report results", cache)
    return {p.name: p.read_bytes() for p in plots}


def test_a_second_report_with_the_cache_draws_nothing(tmp_path: Path, drawn: list[Plot]) -> None:
    root, cache = fixed_store(tmp_path / "results"), tmp_path / "cache"
    uncached = report_pngs(root, tmp_path / "a" / "r.md")
    drawn.clear()
    assert report_pngs(root, tmp_path / "b" / "r.md", cache) == uncached
    assert len(drawn) == 5
    assert sorted(len(p.stem) for p in cache.iterdir()) == [32] * 5  # a 16-byte hash each
    drawn.clear()
    assert report_pngs(root, tmp_path / "c" / "r.md", cache) == uncached
    assert drawn == []
    assert (tmp_path / "b" / "r.md").read_bytes() == (tmp_path / "c" / "r.md").read_bytes()


def test_a_changed_value_draws_only_its_figure_again(tmp_path: Path, drawn: list[Plot]) -> None:
    root, cache = fixed_store(tmp_path / "results"), tmp_path / "cache"
    before = report_pngs(root, tmp_path / "r.md", cache)
    changed = [
        make_record(sweep="seeds", category="weave", seed=3, repeat=r, metrics={"image_AUROC": 0.8}) for r in (0, 1)
    ]
    write_records(root, changed)  # the same runs (0.85 before), so the same files
    drawn.clear()
    after = report_pngs(root, tmp_path / "r.md", cache)
    assert [type(p).__name__ for p in drawn] == ["SeedsFigure", "ProfileFigure"]  # weave's scores are in both
    assert {n for n in after if after[n] != before[n]} == {"seeds-image_AUROC.png", "profile-categories.png"}
    assert len(list(cache.iterdir())) == 7
    assert after == report_pngs(root, tmp_path / "uncached.md")


def test_a_corrupt_cached_figure_is_drawn_again(tmp_path: Path, drawn: list[Plot]) -> None:
    root, cache = fixed_store(tmp_path / "results"), tmp_path / "cache"
    before = report_pngs(root, tmp_path / "r.md", cache)
    garbage, cut = sorted(cache.iterdir())[:2]
    garbage.write_bytes(b"not a png")
    cut.write_bytes(cut.read_bytes()[:100])  # a PNG's start, cut short
    drawn.clear()
    assert report_pngs(root, tmp_path / "r.md", cache) == before
    assert len(drawn) == 2
    assert {garbage.read_bytes(), cut.read_bytes()} <= set(before.values())


def test_figures_drawn_in_worker_processes_are_the_same_bytes(tmp_path: Path) -> None:
    plots = list(StabilityReport(check(fixed_store(tmp_path / "results")), "x", "r").plots().values())
    assert draw_all(plots, workers=2) == [draw(p) for p in plots]


@pytest.mark.parametrize("blocked", ["read-only", "a file in the way"])
def test_a_cache_that_cannot_be_written_leaves_the_report_as_it_is(tmp_path: Path, blocked: str) -> None:
    root = fixed_store(tmp_path / "results")
    uncached = report_pngs(root, tmp_path / "a" / "r.md")
    if blocked == "read-only":  # (root may still write there: the case below fails for it too)
        cache = tmp_path / "cache"
        cache.mkdir(mode=0o555)
    else:
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "plots"
    assert report_pngs(root, tmp_path / "b" / "r.md", cache) == uncached
    assert (tmp_path / "b" / "r.md").read_bytes() == (tmp_path / "a" / "r.md").read_bytes()


def test_the_cache_forgets_the_figures_used_longest_ago(tmp_path: Path) -> None:
    root, cache = fixed_store(tmp_path / "results"), tmp_path / "cache"
    report_pngs(root, tmp_path / "r.md", cache)
    ours = sorted(cache.iterdir())
    for p in ours:
        os.utime(p, (0, 0))  # older than any other: kept because this report uses them, and touched
    others = [cache / f"{i:032x}.png" for i in range(CACHE_FILES)]
    for i, p in enumerate(others):
        p.write_bytes(PNG)
        os.utime(p, (1000 + i, 1000 + i))
    report_pngs(root, tmp_path / "r.md", cache)
    assert sorted(cache.iterdir()) == sorted([*ours, *others[len(ours) :]])
    assert all(p.stat().st_mtime > 1000 + CACHE_FILES for p in ours)
