"""The ``harness`` command line (every command with an example: docs/cli.md).

Bad input is one line on stderr and exit code 2; a run that failed is exit code 1. Nothing
heavy is imported until a command needs it, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.check import Store
    from harness.record import RunRecord
    from harness.spec import Device, ExperimentSpec

EXIT_FAILED_RUN = 1
EXIT_BAD_INPUT = 2
TRAINING_COMMANDS = {"run", "demo"}


def verdicts_help() -> str:
    """``harness check --help``'s account of how it decides, with the checker's own thresholds."""
    from harness.check.pairs import DEFAULT_TOLERANCE
    from harness.check.power import DEFAULT_DETECT, POWER, SEEDS_NEEDED_CAP
    from harness.check.stats import BOOTSTRAP_SEED, CI, CONFIDENCE, MEANINGFUL, MIN_SEEDS_TO_COMPARE
    from harness.check.verify import METRIC_TOLERANCE

    return f"""\
how it decides:
  groups       runs that differ only in seed and repeat (sweep, model, params, category);
               a seed counts once (its repeats averaged); search trials are left out
  seed spread  n, mean, std, {CI} (scipy BCa bootstrap of the mean, seed {BOOTSTRAP_SEED}), min, max, CV
  determinism  same seed in the same environment (environment_id): bitwise (equal score and map hashes),
               within_tolerance (hashes differ, every metric within --tolerance, default {DEFAULT_TOLERANCE:g}),
               diverged (beyond it), untested (no repeats: set `repeats: 2` in the spec)
  environments same seed in different environments (another machine, ISA, precision, build):
               the same three verdicts (differs for diverged), max |score| difference, whether
               the images rank the same (Kendall tau), metric deltas against the seed spread, the
               environment fields that differ, and each comparison and search winner per environment
  comparison   P(A>B): chance a seed of A beats a seed of B (ties half), {CI} by seeded
               percentile bootstrap; `A better` if the CI is above 0.5 and P >= {MEANINGFUL:g}
               (Bouthillier et al., MLSys 2021), `B better` mirrored, else `within noise`;
               under {MIN_SEEDS_TO_COMPARE} seeds a side, `too few seeds`; only runs on the same data compared
  power        two-sided two-sample t-test at {1 - CONFIDENCE:.0%}, equal seeds a side, exact (noncentral t):
               per group and metric the MDD, the smallest difference two such groups detect with
               {POWER:.0%} power; per comparison the seeds a side that detect --detect (default
               {DEFAULT_DETECT:g}) from the pooled std, or `more than {SEEDS_NEEDED_CAP}`
  across       per model over categories and seeds (two categories or more): mean and IQM with
               stratified bootstrap {CI}s (seeds redrawn within each category), and P(A>B) averaged
               over the categories two models share, with its CI and verdict (Agarwal et al., 2021)
  verified     every ok record's scores_sha256 and image AUROC and F1-max are recomputed from its
               scores and labels (to {METRIC_TOLERANCE:g}); a record that disagrees is corrupt: named on
               stderr, counted, left out of every statistic; a sweep runs it again
exit: 0; 1 with --strict when any determinism verdict is diverged or a record is corrupt; 2 for bad input"""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of usage plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add(sub: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}", formatter_class=_formatter
    )


def _add_set_and_results(parser: argparse.ArgumentParser, examples: str) -> None:
    """The two options `run` and `sweep` share: spec overrides and where records go."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a dotted key of the experiment spec, {examples} (repeatable)",
    )
    parser.add_argument(
        "--results", type=Path, default=None, help="results directory (default: $HARNESS_RESULTS or results/)"
    )


def build_parser() -> argparse.ArgumentParser:
    import harness.synth as synth_defaults
    from harness.check.pairs import DEFAULT_TOLERANCE

    parser = _Parser(
        prog="harness",
        description="Sweep and reproducibility harness for industrial anomaly detection (anomalib 2.x).",
        epilog="example:\n  harness data synth datasets/synth && harness run --model patchcore "
        "--data-root datasets/synth --category weave --set model_args.pre_trained=false",
        formatter_class=_formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = _add(sub, "data", "data set tools", "harness data synth datasets/synth")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    synth = _add(
        data_sub,
        "synth",
        "write a synthetic data set in MVTec AD layout (deterministic for a seed)",
        "harness data synth datasets/synth --categories weave,disc,grid --size 128 --n-train 40",
    )
    synth.add_argument("out", type=Path, help="root to write ROOT/<category>/{train,test,ground_truth}")
    synth.add_argument(
        "--categories",
        default=",".join(synth_defaults.CATEGORIES),
        help="comma-separated: weave (texture), "
        "disc (object on a plain background), grid (regular structure); default %(default)s",
    )
    synth.add_argument(
        "--n-train", type=int, default=synth_defaults.N_TRAIN, help="good training images per category (%(default)s)"
    )
    synth.add_argument(
        "--n-test",
        type=int,
        default=synth_defaults.N_TEST,
        help="test images per category, a third good, the rest scratch/hole/stain (%(default)s)",
    )
    synth.add_argument("--size", type=int, default=synth_defaults.SIZE, help="image side in pixels (%(default)s)")
    synth.add_argument("--seed", type=int, default=synth_defaults.SEED, help="data seed (%(default)s)")

    run = _add(
        sub,
        "run",
        "one training and test run; prints a one-line summary and stores one record",
        "harness run --model patchcore --data-root datasets/synth --category weave --seed 0 "
        "--set model_args.pre_trained=false --set data.image_size=64",
    )
    run.add_argument("--model", required=True, help="patchcore or ganomaly")
    run.add_argument("--data-root", required=True, help="root of an MVTec-layout (or folder-format) data set")
    run.add_argument("--category", required=True, help="category directory under the root")
    run.add_argument("--seed", type=int, default=0, help="seed of every RNG of the run (0)")
    run.add_argument("--repeat", type=int, default=0, help="repeat index: same-seed reruns for determinism (0)")
    _add_set_and_results(
        run,
        "e.g. model_args.pre_trained=false, data.image_size=64, model_args.weights=/data/resnet18.pth, name=my-study",
    )
    run.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when visible, else CPU"
    )

    sweep = _add(
        sub,
        "sweep",
        "run a study on Ray: a local cluster, or the one at --address; resumes what is missing",
        "harness sweep experiments/smoke.yaml --set data.root=datasets/synth\n"
        "  ray job submit --address http://HEAD:8265 --working-dir . -- "
        "harness sweep experiments/patchcore_seeds.yaml --address auto --results /shared/results",
    )
    sweep.add_argument("spec", type=Path, help="experiment spec (YAML), e.g. experiments/smoke.yaml")
    sweep.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: `auto` inside `ray job submit`, or HOST:6379; default: start a local one",
    )
    _add_set_and_results(sweep, "e.g. data.root=/data/mvtec, seeds=[0,1], resources.cpu=1")

    check = _add(
        sub,
        "check",
        "reproducibility verdicts from a results store: seed variance, determinism, environments, model comparison",
        "harness check results --strict\n  harness check results --json > check.json\n"
        "  harness check results-machine-a results-machine-b   (the same study, lined up)",
    )
    check.add_argument(
        "results", type=Path, nargs="+", help="results directory (RESULTS/<sweep>/runs/*.json); several line up"
    )
    _add_sweep(check)
    check.add_argument(
        "--json", action="store_true", help="print the machine-readable document (keys in docs/check-json.md)"
    )
    check.add_argument(
        "--strict", action="store_true", help="exit 1 when a same-seed repeat diverged or a record is corrupt"
    )
    check.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="X",
        help=f"largest absolute metric difference still `within_tolerance` (default {DEFAULT_TOLERANCE:g})",
    )
    _add_detect(check)
    check.epilog = (check.epilog or "") + "\n\n" + verdicts_help()

    report = _add(
        sub,
        "report",
        "markdown stability report with PNG plots beside it (same store, same bytes)",
        "harness report demo/results --out reports/demo.md",
    )
    report.add_argument(
        "results", type=Path, nargs="+", help="results directory (RESULTS/<sweep>/runs/*.json); several line up"
    )
    _add_sweep(report)
    _add_detect(report)
    report.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report file; plots go to the folder of its name beside it "
        "(default: reports/<sweep>.md, or reports/<results dir>.md for several sweeps)",
    )

    export = _add(
        sub,
        "export",
        "the records as a table, one row per run (every field, dotted columns): Parquet or CSV",
        "harness export results --out runs.parquet\n  harness export results --sweep smoke --out smoke.csv\n"
        "  harness export results --scores --out scores.parquet   (per-image scores, long form)",
    )
    export.add_argument("results", type=Path, help="results directory (RESULTS/<sweep>/runs/*.json)")
    _add_sweep(export)
    export.add_argument("--out", type=Path, required=True, help="a .parquet or .csv file (columns: docs/analysis.md)")
    export.add_argument(
        "--scores", action="store_true", help="per-image scores (run_id, image_path, label, score) instead of runs"
    )

    demo = _add(
        sub,
        "demo",
        "the whole pipeline on synthetic data: PatchCore seed study, GANomaly search, check, report, "
        "W&B offline (no data set, GPU, account or network; about 3 minutes on 2 cores)",
        "harness demo",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo"),
        help="everything it makes goes here (default demo/): data/, results/, check.json, reports/demo.md",
    )
    return parser


def _sweep_name(value: str) -> str:
    from harness.spec import SWEEP_NAME

    if value != "*" and not re.fullmatch(SWEEP_NAME, value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a sweep name (letters, digits, . _ -)")
    return value


def _add_sweep(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sweep", default="*", type=_sweep_name, metavar="NAME", help="only this sweep's records (default: all)"
    )


def _add_detect(parser: argparse.ArgumentParser) -> None:
    from harness.check.power import DEFAULT_DETECT

    parser.add_argument(
        "--detect",
        type=float,
        default=DEFAULT_DETECT,
        metavar="X",
        help=f"the difference in a metric each comparison sizes its seeds for (default {DEFAULT_DETECT:g})",
    )


def cmd_synth(ns: argparse.Namespace) -> int:
    from harness.synth import synth

    categories = tuple(c.strip() for c in ns.categories.split(",") if c.strip())
    s = synth(ns.out, categories, n_train=ns.n_train, n_test=ns.n_test, size=ns.size, seed=ns.seed)
    print(
        f"wrote {len(s.categories)} categories ({', '.join(s.categories)}) to {s.root}: "
        f"{s.n_train} train, {s.n_test_good} good + {s.n_test_defect} defective test images each"
    )
    return 0


# Keys `harness run` sets from its own flags; overriding them with --set would be ignored.
_RUN_FLAG_KEYS = {
    "model": "--model",
    "data.root": "--data-root",
    "data.categories": "--category",
    "seeds": "--seed",
    "repeats": "--repeat",
}


def _format_summary(record: RunRecord, path: Path) -> str:
    from harness.formatting import GIB, fmt_metrics, run_name

    head = run_name(record)
    if not record.ok:
        return f"FAILED {head}: {record.first_error_line()} -> {path}"
    t, m = record.timing, record.memory
    return (
        f"{head}: {fmt_metrics(record.metrics)} fit={t.fit_s:.1f}s test={t.test_s:.1f}s "
        f"peak_rss={m.peak_rss_bytes / GIB:.2f}GiB -> {path}"
    )


def execute_run(
    model: str,
    data_root: str,
    category: str,
    seed: int,
    repeat: int,
    overrides: list[str],
    results: Path | None,
    device: Device,
) -> tuple[RunRecord, Path]:
    """Validate everything, run once, store the record: ``harness run``."""
    from harness.spec import apply_overrides, parse_set, run_spec, set_origins, validate_spec
    from harness.store import ResultsStore, default_results_dir

    parsed = parse_set(overrides)
    for parts, _ in parsed:
        flag = _RUN_FLAG_KEYS.get(".".join(parts))
        if flag:
            raise HarnessError(f"--set {'.'.join(parts)}: use {flag} for `harness run`")
    raw = {"model": model, "data": {"root": data_root, "categories": [category]}, "seeds": [seed]}
    # An error in a value a flag or an override gave names that flag or override.
    spec = validate_spec(apply_overrides(raw, parsed), origins={**_RUN_FLAG_KEYS, **set_origins(overrides)})
    if repeat < 0:
        raise HarnessError(f"--repeat must be >= 0, got {repeat}")
    store = ResultsStore(results or default_results_dir())
    store.check_writable()
    from harness.run import run_one
    from harness.tracking import open_tracker

    tracker = open_tracker(spec, store.root)  # online without a key fails here, before the run
    if tracker is not None:
        tracker.attach(store)
    try:
        record = run_one(run_spec(spec, category, seed, repeat, device, environment=_one_environment(spec)))
        path = store.put(record)
        if tracker is not None:
            tracker.finish(store, summary=False)
    finally:
        if tracker is not None:
            tracker.close()
    return record, path


def _one_environment(spec: ExperimentSpec) -> str | None:
    """``harness run`` runs in one environment: the one ``--set environments.NAME...`` names."""
    names = list(spec.environments or {})
    if len(names) > 1:
        raise HarnessError(f"environments: `harness run` makes one run; name one environment, not {len(names)}")
    return names[0] if names else None


def cmd_run(ns: argparse.Namespace) -> int:
    record, path = execute_run(ns.model, ns.data_root, ns.category, ns.seed, ns.repeat, ns.set, ns.results, ns.device)
    print(_format_summary(record, path))
    return EXIT_FAILED_RUN if record.status == "failed" else 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    from harness.spec import load_spec
    from harness.store import default_results_dir
    from harness.sweep import sweep

    spec = load_spec(ns.spec, ns.set)
    results = ns.results or default_results_dir()
    print(f"sweep {spec.name} ({spec.study}, {spec.model}): records in {results / spec.name / 'runs'}")
    tally = sweep(spec, results, ns.address)
    print("\n".join(tally.summary(spec.name)))
    return 0 if tally.clean else EXIT_FAILED_RUN


def _say_bad_records(command: str, store: Store) -> None:
    """One stderr line per record file left out: not a record, or not true to its scores."""
    for path, error in store.malformed:
        print(f"harness {command}: malformed record {store.full(path)}: {error} (skipped)", file=sys.stderr)
    for path, error in store.corrupt:
        print(f"harness {command}: corrupt record {store.full(path)}: {error} (left out)", file=sys.stderr)


def cmd_check(ns: argparse.Namespace) -> int:
    from harness.check import DEFAULT_TOLERANCE, CheckReport, to_text
    from harness.check.groups import check_output

    tolerance = DEFAULT_TOLERANCE if ns.tolerance is None else ns.tolerance
    store, text, strict = check_output(
        ns.results, tolerance, ns.sweep, ns.detect, CheckReport.json_text if ns.json else to_text
    )
    _say_bad_records("check", store)
    print(text, end="")
    return EXIT_FAILED_RUN if ns.strict and strict else 0


def cmd_report(ns: argparse.Namespace) -> int:
    from harness.check import check
    from harness.check.memo import MEMO_DIR
    from harness.report import default_out, report_command, write_report

    if ns.out is not None and ns.out.suffix != ".md":
        raise HarnessError(f"--out {ns.out}: name a .md file (its plots go to the folder of the same name)")
    rep = check(ns.results, sweep=ns.sweep, detect=ns.detect)
    out = ns.out or default_out(rep)
    command = report_command(ns.results, ns.sweep, ns.out)
    path, plots = write_report(rep, out, command, cache=rep.store.root / MEMO_DIR / "plots")
    _say_bad_records("report", rep.store)
    print(f"wrote {path} ({len(rep.groups)} groups, {len(plots)} plots in {path.parent / path.stem})")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from harness.analysis import export, export_format, load_runs, load_scores

    export_format(ns.out)  # a wrong suffix fails before the store is read
    sweeps = None if ns.sweep == "*" else [ns.sweep]
    frame = (load_scores if ns.scores else load_runs)(ns.results, sweeps)
    export(frame, ns.out)
    print(f"wrote {ns.out} ({len(frame)} rows, {len(frame.columns)} columns)")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from harness.demo import demo

    return 0 if demo(ns.out) else EXIT_FAILED_RUN


COMMANDS = {
    "synth": cmd_synth,
    "run": cmd_run,
    "sweep": cmd_sweep,
    "check": cmd_check,
    "report": cmd_report,
    "export": cmd_export,
    "demo": cmd_demo,
}


def _reexec_with_malloc_env(argv: list[str]) -> None:
    from harness.malloc import MALLOC_ENV

    if all(k in os.environ for k in MALLOC_ENV):
        return  # already set, by us or deliberately by the user
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "harness", *argv], env)


def main(argv: list[str] | None = None) -> int:
    """Entry point; with ``argv=None`` it is a real process and may re-exec itself once."""
    args = sys.argv[1:] if argv is None else argv
    ns = build_parser().parse_args(args)
    name = ns.data_command if ns.command == "data" else ns.command
    if argv is None and ns.command in TRAINING_COMMANDS:
        _reexec_with_malloc_env(args)
    # SIGTERM (kill, a job scheduler, docker stop) stops a command as Ctrl-C does, through the
    # same clean-up (a local Ray cluster is shut down); signals reach the main thread only.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        return COMMANDS[name](ns)
    except HarnessError as exc:
        print(f"harness {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # an unwritable output, a full disk: where, and what to do
        from harness.fsutil import os_error_line

        print(f"harness {ns.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"harness {ns.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
