"""Claims on planned runs: one sweep computes a run, a dead sweep's claims do not block."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.spec import RunSpec
from harness.sweep.claims import Claims, claim_key
from tests.conftest import make_run_spec


@pytest.fixture
def run(tmp_path: Path) -> RunSpec:
    return make_run_spec("patchcore", tmp_path / "data")


def test_one_sweep_holds_a_run_until_it_releases_it(tmp_path: Path, run: RunSpec) -> None:
    mine, theirs = Claims(tmp_path / "claims"), Claims(tmp_path / "claims")
    assert mine.take(run)
    assert mine.take(run)  # taking one's own claim again is a no-op
    assert not theirs.take(run)
    assert theirs.holder(run) == f"pid {os.getpid()} on {os.uname().nodename}"
    theirs.release(run)  # not theirs to release
    assert not theirs.take(run)
    mine.release(run)
    assert theirs.holder(run) is None
    assert theirs.take(run)
    theirs.release_all()
    assert not list((tmp_path / "claims").iterdir())


def test_a_dead_sweeps_claim_is_taken_over(tmp_path: Path, run: RunSpec) -> None:
    """Same machine: the claiming process is gone (a killed driver), whatever the lease says."""
    folder = tmp_path / "claims"
    code = (
        "import sys, pathlib; from harness.spec import RunSpec; from harness.sweep.claims import Claims; "
        "run = RunSpec.model_validate_json(sys.stdin.read()); assert Claims(pathlib.Path(sys.argv[1])).take(run)"
    )
    subprocess.run([sys.executable, "-c", code, str(folder)], input=run.model_dump_json(), text=True, check=True)
    (claim,) = folder.glob("*.json")
    assert claim.stem == claim_key(run)
    other = Claims(folder, lease_s=3600)
    assert other.holder(run) is None
    assert other.take(run)
    assert json.loads(claim.read_text())["token"] == other.token


def test_a_claim_from_another_machine_lasts_its_lease(tmp_path: Path, run: RunSpec) -> None:
    """Another machine's process cannot be looked up: its claim is stale once not renewed."""
    folder = tmp_path / "claims"
    Claims(folder).take(run)
    (claim,) = folder.glob("*.json")
    claim.write_text(json.dumps({**json.loads(claim.read_text()), "host": "elsewhere", "token": "x"}))
    assert not Claims(folder, lease_s=3600).take(run)
    old = claim.stat().st_mtime - 120
    os.utime(claim, (old, old))
    late = Claims(folder, lease_s=60)
    assert late.take(run)
    assert json.loads(claim.read_text())["token"] == late.token


def test_a_torn_claim_blocks_only_for_its_lease(tmp_path: Path, run: RunSpec) -> None:
    folder = tmp_path / "claims"
    folder.mkdir()
    torn = folder / f"{claim_key(run)}.json"
    torn.write_text('{"pid": ')
    assert not Claims(folder, lease_s=3600).take(run)
    old = torn.stat().st_mtime - 120
    os.utime(torn, (old, old))
    assert Claims(folder, lease_s=60).take(run)
