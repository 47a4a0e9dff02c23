"""The README and docs/ checked against the code, with nothing trained: every relative link
resolves (anchors included), every `harness` and `make` command shown in a ```bash block is one
the real CLI and Makefile accept (specs loaded with their overrides), and the thresholds the
docs state are the ones the checker defines."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from harness.check.pairs import DEFAULT_TOLERANCE
from harness.check.power import DEFAULT_DETECT, POWER, SEEDS_NEEDED_CAP
from harness.check.stats import BOOTSTRAP_SEED, CONFIDENCE, MEANINGFUL, MIN_SEEDS_TO_COMPARE, N_RESAMPLES
from harness.check.verify import METRIC_TOLERANCE
from harness.cli import build_parser
from harness.errors import HarnessError
from harness.spec import apply_overrides, load_spec, parse_set, validate_spec

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"````.*?````|```.*?```|``.*?``|`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", ">&", "&>"}
MAKE_TARGET = re.compile(r"^([A-Za-z][\w.-]*)[ \t]*:(?!=)", re.M)
DOC_SPEC = re.compile(r"^#\s*([\w.-]+\.yaml)\b")  # a yaml block that opens with `# NAME.yaml` defines NAME.yaml


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def prose(text: str) -> str:
    """A page without its code: fenced blocks and inline code spans (which may hold brackets)."""
    return INLINE_CODE.sub("", without_code_blocks(text))


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, heading in HEADING.findall(without_code_blocks(page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


# --- links ---------------------------------------------------------------------------------


def test_every_page_closes_its_code_blocks() -> None:
    for page in PAGES:
        fences = [line for line in page.read_text().splitlines() if line.startswith("```")]
        assert len(fences) % 2 == 0, f"{rel(page)}: a code block is not closed"


def test_every_relative_link_points_at_something_that_exists() -> None:
    checked = 0
    for page in PAGES:
        for target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{rel(page)}: link {target!r}: {path} does not exist"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest), f"{rel(page)}: link {target!r}: no heading #{anchor} in {rel(dest)}"
            checked += 1
    assert checked >= 40  # the README alone links every page


def test_every_docs_page_the_code_cites_exists() -> None:
    cited = set()
    for source in [*REPO.glob("harness/**/*.py"), *REPO.glob("tests/**/*.py"), REPO / "Makefile"]:
        cited |= {(m, rel(source)) for m in re.findall(r"\bdocs/([\w-]+\.md)", source.read_text())}
    assert {"design.md", "cli.md", "check-json.md"} <= {name for name, _ in cited}
    for name, source in sorted(cited):
        assert (DOCS / name).is_file(), f"{source} cites docs/{name}, which does not exist"


def test_every_test_the_fault_tolerance_page_names_is_a_test() -> None:
    """Each case there is backed by a named test: a renamed or deleted one shows here."""
    named = set(re.findall(r"\b(test_\w+)\b(?!\.py)", (DOCS / "fault-tolerance.md").read_text()))
    defined = {n for p in REPO.glob("tests/**/*.py") for n in re.findall(r"^def (test_\w+)", p.read_text(), re.M)}
    assert len(named) >= 10
    assert named <= defined, named - defined


def test_the_readme_is_a_landing_page_that_links_every_doc() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 220, "the README is a landing page: move detail to docs/"
    linked = {target.partition("#")[0] for target in links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert len(pages) >= 10
    for page in pages:
        assert f"docs/{page.name}" in linked, f"the README's 'Where to go next' does not link docs/{page.name}"


# --- commands ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    page: str
    line: str  # as shown, continuation lines joined
    argv: list[str]  # one simple command of it: no separators, redirections, comments

    def __str__(self) -> str:
        return f"{self.page}: {self.line!r}"


def shell_lines(block: str) -> list[str]:
    """A block's command lines: in a transcript (`$ ` prompts), only the prompted lines."""
    lines = block.replace("\\\n", " ").splitlines()
    if any(line.startswith("$ ") for line in lines):
        return [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line.strip()]


def simple_commands(line: str) -> list[list[str]]:
    """``a && b > f | c # note`` -> ``[[a], [b], [c]]``, as the shell would split it."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands: list[list[str]] = [[]]
    words = iter(lex)
    for word in words:
        if word in SEPARATORS:
            commands.append([])
        elif word in REDIRECTS:
            next(words, None)  # the file it redirects to
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def doc_commands() -> list[Command]:
    out = []
    for page in PAGES:
        for block in code_blocks(page.read_text(), "bash"):
            for line in shell_lines(block):
                for argv in simple_commands(line):
                    while argv and (ENV_ASSIGNMENT.match(argv[0]) or argv[0] == "time"):
                        argv = argv[1:]
                    if argv:
                        out.append(Command(rel(page), line.strip(), argv))
    return out


def harness_argv(argv: list[str]) -> list[str] | None:
    """The `harness ...` part of a command: itself, or after ``--`` (``ray job submit -- harness
    ...``) or ``exec SERVICE`` (``docker compose exec head harness ...``)."""
    if argv[0] == "harness":
        return argv
    for i in range(1, len(argv)):
        if argv[i] == "harness" and (argv[i - 1] == "--" or (i >= 2 and argv[i - 2] == "exec")):
            return argv[i:]
    return None


def doc_specs(tmp: Path) -> dict[str, Path]:
    """Specs the docs write out in full (a ```yaml block opening with `# NAME.yaml`), saved as NAME."""
    specs = {}
    for page in PAGES:
        for block in code_blocks(page.read_text(), "yaml"):
            m = DOC_SPEC.match(block)
            if m:
                specs[m.group(1)] = tmp / m.group(1)
                specs[m.group(1)].write_text(block)
    return specs


def parse(cmd: Command, argv: list[str]) -> argparse.Namespace | None:
    """argparse on ``argv[1:]`` with the real parser; an unknown flag fails the test, naming the line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        if exc.code == 0 and {"-h", "--help"} & set(argv):
            return None
        pytest.fail(f"{cmd}: the harness CLI refuses it: {err.getvalue().strip()}")


def check_spec(cmd: Command, ns: argparse.Namespace, specs: dict[str, Path]) -> None:
    """The spec a `harness sweep` or `harness run` line names, loaded with its --set overrides
    (a spec under /app is the image's copy of experiments/)."""
    try:
        if ns.command == "sweep":
            spec: Path = ns.spec
            if str(spec) in specs:
                path = specs[str(spec)]
            else:
                path = REPO / spec.relative_to("/app") if spec.is_absolute() else REPO / spec
            assert path.is_file(), f"{cmd}: no spec {spec} in the repository, nor written out in the docs"
            load_spec(path, ns.set)
        elif ns.command == "run":
            raw = {"model": ns.model, "data": {"root": ns.data_root, "categories": [ns.category]}}
            validate_spec(apply_overrides(raw, parse_set(ns.set)))
    except HarnessError as exc:
        pytest.fail(f"{cmd}: its spec does not load: {exc}")


def makefile_targets() -> set[str]:
    return set(MAKE_TARGET.findall((REPO / "Makefile").read_text()))


def test_the_command_collector_reads_what_a_shell_would_run() -> None:
    transcript = (
        "$ harness check r --json > out.json  # note\noutput line\n$ A=1 make demo PYTHON=python3.11 && \\\n  ls\n"
    )
    first, second = shell_lines(transcript)  # the output line is no command
    assert simple_commands(first) == [["harness", "check", "r", "--json"]]
    assert simple_commands(second) == [["A=1", "make", "demo", "PYTHON=python3.11"], ["ls"]]
    assert simple_commands("ssh -N host & ray job submit -- harness sweep s.yaml") == [
        ["ssh", "-N", "host"],
        ["ray", "job", "submit", "--", "harness", "sweep", "s.yaml"],
    ]
    assert harness_argv(["docker", "compose", "exec", "head", "harness", "check", "r"]) == ["harness", "check", "r"]
    assert harness_argv(["wandb", "sync", "harness"]) is None


def test_every_harness_and_make_command_in_the_docs_is_real(tmp_path: Path) -> None:
    specs = doc_specs(tmp_path)
    targets = makefile_targets()
    assert {"demo", "test"} <= targets
    harness, make, subcommands = 0, 0, set()
    for cmd in doc_commands():
        argv = harness_argv(cmd.argv)
        if argv is not None:
            ns = parse(cmd, argv)
            if ns is not None:
                check_spec(cmd, ns, specs)
                subcommands.add(ns.data_command if ns.command == "data" else ns.command)
            harness += 1
        elif cmd.argv[0] == "make":
            for target in (w for w in cmd.argv[1:] if not w.startswith("-") and "=" not in w):
                assert target in targets, f"{cmd}: the Makefile has no target {target!r}"
            make += 1
        elif cmd.argv[0] == "bash" and cmd.argv[1].endswith(".sh"):
            assert (REPO / cmd.argv[1]).is_file(), f"{cmd}: no script {cmd.argv[1]}"
    assert harness >= 30, harness
    assert make >= 7, make
    assert subcommands == {"synth", "run", "sweep", "check", "report", "export", "demo"}  # every command is shown


def test_the_minimal_spec_is_a_patchcore_seed_study_that_loads(tmp_path: Path) -> None:
    specs = doc_specs(tmp_path)
    assert "seed-study.yaml" in specs
    for name, path in specs.items():
        try:
            spec = load_spec(path)
        except HarnessError as exc:
            pytest.fail(f"the docs' {name} does not load: {exc}")
        assert yaml.safe_load(path.read_text())["name"] == spec.name
    spec = load_spec(specs["seed-study.yaml"])
    assert (spec.study, spec.model, spec.seeds, spec.repeats) == ("seeds", "patchcore", [0, 1, 2], 2)
    assert spec.model_args == {"pre_trained": False}
    assert spec.data.image_size == 64
    assert spec.resources.cpu == 1
    assert spec.resources.gpu == 0  # runs anywhere


# --- thresholds ----------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["design.md", "cli.md"])
def test_the_docs_state_the_thresholds_the_code_defines(page: str) -> None:
    text = " ".join((DOCS / page).read_text().split())  # line breaks as spaces
    phrases = [
        f"within `--tolerance`, default {DEFAULT_TOLERANCE:g}",
        f"above 0.5 and P(A>B) ≥ {MEANINGFUL:g}",
        f"`too few seeds` under {MIN_SEEDS_TO_COMPARE} seeds a side",
        f"{N_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}",
        f"{CONFIDENCE:.0%} CI",
        f"{POWER:.0%} power",
        f"default {DEFAULT_DETECT:g}",
        f"more than {SEEDS_NEEDED_CAP}",
    ]
    if page == "design.md":
        phrases.append(f"within {METRIC_TOLERANCE:g} | `METRIC_TOLERANCE`")
    for phrase in phrases:
        assert phrase in text, f"docs/{page} no longer says {phrase!r} (the checker's value)"
