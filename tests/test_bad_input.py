"""Input the fault matrix threw at the harness (issue 17): each is one line naming what is wrong."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from msgspec.structs import replace

from harness.cli import main
from harness.errors import HarnessError
from harness.fsutil import atomic_write_bytes
from harness.spec import MAX_SPEC_BYTES, load_spec, validate_spec
from harness.store import ResultsStore
from tests.conftest import kill_ray_processes
from tests.recordkit import make_record, typed, write_records

SPEC = "model: patchcore\ndata: {root: /data, categories: [disc]}\n"
BASE = {"model": "patchcore", "data": {"root": "/data", "categories": ["disc"]}}


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(bytes(range(128, 256)) * 2), "{p}: not a text file (byte 0 is not UTF-8)"),
        (lambda p: p.mkdir(), "{p}: a directory, not a spec file"),
        (lambda p: p.write_text("# padding\n" * (MAX_SPEC_BYTES // 10 + 1)), "{p}: larger than 1 MiB"),
        (lambda p: p.parent.joinpath("f").write_text(""), "spec not found: {p}"),
    ],
    ids=["binary", "directory", "too big", "missing"],
)
def test_an_unreadable_spec_is_one_line_naming_it(tmp_path: Path, make: Callable[[Path], object], message: str) -> None:
    path = tmp_path / "s.yaml"
    make(path)
    with pytest.raises(HarnessError) as err:
        load_spec(path)
    assert one_line(err).startswith(message.format(p=path))


def test_a_spec_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(HarnessError) as err:
        load_spec(tmp_path / "f" / "s.yaml")
    assert one_line(err) == f"cannot read spec {tmp_path / 'f' / 's.yaml'}: Not a directory"


BOMB = "\n".join(
    [f"a: &a [{', '.join(['x'] * 10)}]"]
    + [f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)]
)
CHILD = """
import resource, sys, time
from pathlib import Path
from harness.errors import HarnessError
from harness.spec import load_spec
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
start = time.perf_counter()
try:
    load_spec(Path(sys.argv[1]))
except HarnessError as exc:
    print(f"{time.perf_counter() - start:.3f} {exc}")
"""


@pytest.mark.parametrize(
    ("text", "message", "seconds"),
    [
        (BOMB, "more than 100,000 values once YAML aliases are expanded", 0.5),
        ("model: &a [*a]\n", "a YAML alias inside its own anchor (a cycle)", 0.5),
        # PyYAML gives up at a few hundred levels, however deep the file goes (1.5 s here).
        ("a: " + "[" * 50_000 + "]" * 50_000, "not valid YAML (nested too deeply)", 10),
    ],
    ids=["alias bomb", "cycle", "deep"],
)
def test_an_alias_bomb_fails_fast_in_bounded_memory(tmp_path: Path, text: str, message: str, seconds: float) -> None:
    """Nine levels of ten aliases are a billion values: refused in well under a second, under 1 GiB."""
    path = tmp_path / "bomb.yaml"
    path.write_text(text + "\n")
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    took, error = out.stdout.strip().split(" ", 1)
    assert error == f"{path}: {message}"
    assert float(took) < seconds


@pytest.mark.parametrize("name", ["../data/weave", "/abs/path/weave", "..", ".", "a/b", "", "a\0b", "a\\b"])
def test_a_category_is_one_directory_name(name: str) -> None:
    with pytest.raises(HarnessError) as err:
        validate_spec({**BASE, "data": {"root": "/data", "categories": ["disc", name]}}, "s.yaml")
    assert one_line(err).startswith(f"s.yaml: data.categories.1: {name!r} is not one directory name under data.root")


RULE = "(relative, no '..' or NUL)"


@pytest.mark.parametrize(
    ("key", "value"),
    [("normal_dir", "../other"), ("abnormal_dir", "/abs/defect"), ("mask_dir", "masks/../../x"), ("mask_dir", "m\0")],
)
def test_folder_directories_stay_inside_the_category(key: str, value: str) -> None:
    data = {"root": "/data", "categories": ["part"], "format": "folder", key: value}
    with pytest.raises(HarnessError) as err:
        validate_spec({**BASE, "data": data})
    assert (
        one_line(err) == f"data.{key}: {value!r} is not a path inside the category directory (relative, no '..' or NUL)"
    )
    spec = validate_spec({**BASE, "data": {**data, key: "sub/dir"}})
    assert getattr(spec.data, key) == "sub/dir"


def test_run_names_the_category_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--model", "patchcore", "--data-root", str(tmp_path), "--category", "../weave"]
    assert main([*args, "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness run: error: --category: data.categories.0: '../weave' is not one directory name")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("repeats=two", "--set repeats=two: repeats: Input should be a valid integer"),
        ("seeds=0,1,2", "--set seeds=0,1,2: seeds: Input should be a valid list (write a list in brackets: [0,1,2])"),
        ("model_args.pre_trained=no", "--set model_args.pre_trained=no: model_args.pre_trained: 'no' is not a boolean"),
        ("model_args.pre_trained=on", "--set model_args.pre_trained=on: model_args.pre_trained: 'on' is not a bool"),
        ("deterministic=yes", "--set deterministic=yes: deterministic: 'yes' is not a boolean: write true or false"),
        ("deterministic=0", "--set deterministic=0: deterministic: 0 is not a boolean: write true or false"),
        ("environments.a.onednn=off", "--set environments.a.onednn=off: environments.a.onednn: 'off' is not a bool"),
        ("data={root: /d}", "--set data={root: /d}: data.categories: Field required"),
    ],
)
def test_a_bad_override_is_named_as_the_override(tmp_path: Path, item: str, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SPEC)
    with pytest.raises(HarnessError) as err:
        load_spec(path, [item])
    assert one_line(err).startswith(message)


def test_only_true_and_false_are_booleans(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SPEC + "deterministic: off\n")
    with pytest.raises(HarnessError) as err:
        load_spec(path)
    assert one_line(err) == f"{path}: deterministic: 'off' is not a boolean: write true or false"
    path.write_text(SPEC + "deterministic: False\nname: yes\n")
    spec = load_spec(path, ["model_args.pre_trained=false"])
    assert (spec.deterministic, spec.name, spec.model_params()["pre_trained"]) == (False, "yes", False)


def test_a_mistyped_sweep_lists_the_sweeps_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_records(tmp_path, [make_record(sweep="seeds"), make_record(sweep="hpo")])
    assert main(["check", str(tmp_path), "--sweep", "seedz"]) == 2
    assert (
        capsys.readouterr().err == f"harness check: error: no sweep 'seedz' in {tmp_path} (sweeps there: hpo, seeds)\n"
    )


@pytest.mark.parametrize("command", ["check", "report"])
def test_a_file_is_not_a_results_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    path = tmp_path / "record.json"
    path.write_text("{}")
    assert main([command, str(path)]) == 2
    assert capsys.readouterr().err == (
        f"harness {command}: error: {path} is a file, not a results directory (RESULTS/<sweep>/runs/<run_id>.json)\n"
    )


def test_results_under_a_file_name_the_file_in_the_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    record = typed(make_record(sweep="s"))
    with pytest.raises(HarnessError) as err:
        ResultsStore(tmp_path / "f" / "sub").put(record)
    path = tmp_path / "f" / "sub" / "s" / "runs" / f"{record.run_id}.json"
    assert one_line(err) == f"cannot write {path}: Not a directory ({tmp_path / 'f'} is a file, not a directory)"
    assert isinstance(err.value, OSError)
    assert err.value.errno == errno.ENOTDIR
    # Anything else the CLI meets there says the same, not a bare [Errno 20].
    assert main(["data", "synth", str(tmp_path / "f" / "x"), "--categories", "grid"]) == 2
    assert capsys.readouterr().err == (
        f"harness data: error: {tmp_path / 'f' / 'x'}: Not a directory ({tmp_path / 'f'} is a file, not a directory)\n"
    )


@pytest.mark.parametrize(
    ("call", "code", "advice"),
    [
        ("fsync", errno.ENOSPC, "No space left on device (free some space or write elsewhere)"),
        ("replace", errno.EROFS, "Read-only file system (write elsewhere)"),
        ("replace", errno.EACCES, "Permission denied (check its permissions)"),
    ],
)
def test_a_failed_write_says_where_and_what_to_do_and_keeps_the_stored_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int, advice: str
) -> None:
    store = ResultsStore(tmp_path)
    record = typed(make_record(sweep="s"))
    path = store.put(record)
    stored = path.read_bytes()

    def fail(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, call, fail)
    with pytest.raises(HarnessError) as err:
        store.put(replace(record, error="a rerun"))
    monkeypatch.undo()
    assert one_line(err) == f"cannot write {path}: {advice}"
    assert path.read_bytes() == stored, "the stored record is kept whole"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "and no temp file is left"
    atomic_write_bytes(path, b"{}")  # the same path writes again once the disk allows it


def _reader_is_waiting(fifo: Path, proc: subprocess.Popen[str], timeout_s: float = 60) -> int:
    """Open the FIFO's writing end once the process has opened its reading end (and so runs
    with its signal handlers set): it then blocks reading, until the writer closes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            time.sleep(0.05)
    raise AssertionError(f"the reader never opened {fifo}: {proc.communicate()}")


def test_sigterm_stops_a_command_as_ctrl_c_does(tmp_path: Path) -> None:
    """`harness sweep` reading its spec from a FIFO blocks there; SIGTERM ends it as Ctrl-C would."""
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "sweep", str(fifo), "--results", str(tmp_path / "r")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = _reader_is_waiting(fifo, proc)
    try:
        time.sleep(0.2)  # into the read
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(writer)
    assert proc.returncode == 130, err
    assert (out, err) == ("", "harness sweep: interrupted\n")


@pytest.mark.slow
def test_sigterm_stops_a_sweep_and_the_ray_cluster_it_started(tmp_path: Path, synth_root: Path, ray_tmp: Path) -> None:
    """Ray's init sets its own SIGTERM handler (an exit that aborts in its shutdown): the sweep's
    must win, so that SIGTERM mid-sweep stops it as Ctrl-C does, whole records kept."""
    spec = tmp_path / "s.yaml"
    data = {"root": str(synth_root), "categories": ["disc"], "image_size": 64, "train_batch_size": 8}
    doc = {"name": "sig", "model": "patchcore", "model_args": {"pre_trained": False}, "data": data}
    spec.write_text(yaml.safe_dump({**doc, "seeds": list(range(100)), "resources": {"cpu": 1}, "max_concurrent": 1}))
    results = tmp_path / "results"
    driver = subprocess.Popen(
        [sys.executable, "-m", "harness", "sweep", str(spec), "--results", str(results)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = ResultsStore(results)
    deadline = time.monotonic() + 300
    while not store.relpaths() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err[-3000:]
    assert err == "harness sweep: interrupted\n"
    assert kill_ray_processes(ray_tmp, grace_s=10) == 0, "the local cluster is shut down"
    stored = store.records("sig")
    assert 1 <= len(stored) < 100
    assert len(stored) == len(store.relpaths()), "every stored file is a whole record"


def test_the_docs_state_the_spec_bounds() -> None:
    text = (Path(__file__).parent.parent / "docs" / "specs.md").read_text()
    assert "1 MiB" in text
    assert "100,000 values" in text
    assert "write true or false" in text
