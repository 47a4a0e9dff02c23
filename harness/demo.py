"""``harness demo``: the whole pipeline on the embedded default, on any machine.

Synthetic data, a local Ray cluster, a PatchCore seed study, a GANomaly search with its best
configuration's seed runs, a PatchCore study in three execution environments, a study per
model of where the seed spread comes from (variance by source), the
reproducibility check, the report and W&B offline runs: no data
set, GPU, account or network needed. It is the newcomer's first command and what CI runs, so
it goes through the same functions as ``harness data synth``, ``sweep``, ``check`` and
``report``, and its two studies are ordinary specs (``harness/demo_specs/``) a user can rerun.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from harness.check import check, to_text
from harness.formatting import fmt_duration
from harness.fsutil import atomic_write_bytes, check_writable
from harness.report import report_command, write_report
from harness.spec import ExperimentSpec, load_spec
from harness.sweep import cluster, sweep
from harness.synth import synth
from harness.tracking import sweep_wandb_dir, wandb_mode

SPECS = ("patchcore.yaml", "ganomaly.yaml", "environments.yaml", "sources-patchcore.yaml", "sources-ganomaly.yaml")
REPORT = Path("reports/demo.md")  # under the demo's directory, as a checkout keeps its reports
STAGES = len(SPECS) + 3  # data, the studies, check, report


def spec_paths() -> list[Path]:
    """The demo's studies, shipped inside the package (the image has no ``experiments/``
    checkout of its own for them)."""
    base = resources.files("harness") / "demo_specs"
    return [Path(str(base / name)) for name in SPECS]


def _shown(path: Path) -> str:
    """A path as a user would type it here: relative to the working directory when under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def demo(out: Path) -> bool:
    """Run every stage, writing everything under ``out``; True when every run is ``ok``.

    Each stage prints the command that does the same by hand, so the demo doubles as a tour.
    Bad input (an unwritable place, a W&B setting that cannot work) stops it before any stage.
    """
    started = time.monotonic()

    def elapsed() -> str:
        return fmt_duration(time.monotonic() - started)

    data, results, report = out / "data", out / "results", out / REPORT
    paths = spec_paths()
    specs = [load_spec(p, [f"data.root={data}"]) for p in paths]
    categories = tuple(specs[0].data.categories)  # every study runs on (some of) the same data
    for spec in specs:
        if spec.tracking.wandb is not None:
            wandb_mode(spec.tracking.wandb)  # WANDB_MODE=online without a key fails here
    check_writable(out, "demo directory")

    def stage(n: int, what: str, command: str) -> None:
        print(f"\n== {n}/{STAGES} {what} [{elapsed()}]\n   by hand: {command}", flush=True)

    stage(1, "synthetic data in MVTec AD layout", f"harness data synth {data} --categories {','.join(categories)}")
    s = synth(data, categories)  # `harness data synth`'s defaults
    n_test = s.n_test_good + s.n_test_defect
    print(f"wrote {', '.join(s.categories)} to {data}: {s.n_train} train and {n_test} test images each, {s.size} px")
    clean = True
    print()
    with cluster(None):  # one for every study
        for n, (path, spec) in enumerate(zip(paths, specs, strict=True), start=2):
            stage(n, _what(spec), f"harness sweep {_shown(path)} --set data.root={data} --results {results}")
            tally = sweep(spec, results)
            print("\n".join(tally.summary(spec.name)), flush=True)
            clean &= tally.clean

    stage(STAGES - 1, "reproducibility check", f"harness check {results} --json > {out / 'check.json'}")
    rep = check(results)
    atomic_write_bytes(out / "check.json", rep.json_text().encode())
    verdicts = ", ".join(f"{n} {v}" for v, n in rep.determinism_counts().items() if n)
    print(f"wrote {out / 'check.json'}: {len(rep.groups)} groups; determinism: {verdicts}")

    command = report_command(results, out=report)
    stage(STAGES, "stability report with plots", command)
    path, plots = write_report(rep, report, command)
    print(f"wrote {path} and {len(plots)} plots in {path.parent / path.stem}")

    print(f"\n== done in {elapsed()}: report {path}\n")
    print(to_text(rep), end="")
    _next_steps(out, results, specs)
    return clean


def _what(spec: ExperimentSpec) -> str:
    cats, seeds = len(spec.data.categories), len(spec.seed_list())
    if spec.environments:
        envs = ", ".join(spec.environments)
        return f"{spec.model} seed study in {len(spec.environments)} environments ({envs}): {seeds} seeds each"
    if spec.sources:
        varied = ", ".join(f"{s} only" for s in spec.sources)
        where = f"{cats} categor{'y' if cats == 1 else 'ies'}"
        return f"{spec.model} variance by source: {where} x {seeds} seeds, as written and {varied}"
    if spec.study == "seeds":
        return f"{spec.model} seed study: {cats} categories x {seeds} seeds x {spec.repeats} repeats"
    return (
        f"{spec.model} search: per category {spec.num_samples} trials on a validation split, "
        f"then the best configuration x {seeds} seeds x {spec.repeats} repeats"
    )


def _next_steps(out: Path, results: Path, specs: list[ExperimentSpec]) -> None:
    wandb_dirs = [sweep_wandb_dir(results, s.name) for s in specs]
    offline = [d for d in wandb_dirs if any(d.glob("offline-run-*"))]
    lines = ["", f"records: {results}/<sweep>/runs/*.json; check: {out / 'check.json'}"]
    if offline:
        lines.append(f"W&B offline runs: {', '.join(map(str, offline))}; upload with: wandb sync <dir>/offline-run-*")
    lines += [
        "",
        "Next:",
        "  on MVTec AD (unpacked under datasets/MVTecAD; nothing is downloaded):",
        "    harness sweep experiments/patchcore_seeds.yaml --set data.root=datasets/MVTecAD",
        "    harness sweep experiments/ganomaly_hpo.yaml --set data.root=datasets/MVTecAD",
        "    (no GPU: add --set resources.gpu=0 --set resources.cpu=2; air-gapped: "
        "--set model_args.weights=/path/resnet18.pth)",
        "  on a Ray cluster (docs/cluster.md), with its dashboard tunnelled to 127.0.0.1:8265:",
        "    ray job submit --address http://127.0.0.1:8265 -- harness sweep /app/experiments/patchcore_seeds.yaml "
        "--address auto --set data.root=/data --results /results",
        f"  this demo again: it resumes (stored runs are not run again); rm -r {results} to run them all again",
    ]
    print("\n".join(lines))
