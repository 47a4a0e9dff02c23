"""Claims on planned runs, so two sweeps writing one store never compute the same run twice.

A sweep claims a run before sending it to Ray (``RESULTS/<sweep>/claims/<key>.json``, made
with ``os.link``: only one maker wins, on a shared file system too) and drops the claim once
its record is stored or the run is lost. Another sweep that finds the claim waits for the
record instead of computing the run. A claim cannot block forever: it is stale when its
sweep's process is gone (same machine: the pid no longer runs the process that claimed) or
when its sweep stopped renewing it (another machine: older than ``LEASE_S``), and a stale
claim is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.hashing import stable_hash
from harness.spec import RunSpec

LEASE_S = 60.0  # a claim not renewed for this long is stale (its sweep is gone or cut off)
RENEW_S = 10.0  # how often a sweep renews its claims


def claim_key(run: RunSpec) -> str:
    """What a claim is on: the planned run, wherever it will run (its id adds the environment)."""
    return stable_hash({**run.key(), "variant": run.environment_name})


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _started(pid: int) -> float | None:
    """When ``pid`` started, or None if no such process: a reused pid does not pass for the
    process that claimed."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _me() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "started": _started(pid)}


@dataclass
class Claims:
    """This sweep's claims in one store's sweep directory."""

    folder: Path
    lease_s: float = LEASE_S
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    held: set[str] = field(default_factory=set)
    me: dict[str, Any] = field(default_factory=_me)  # who this sweep is, in its claims
    _renewed: float = field(default_factory=time.monotonic)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def take(self, run: RunSpec) -> bool:
        """Claim ``run``: True when it is this sweep's to compute now (False: a live sweep has it)."""
        key = claim_key(run)
        if key in self.held:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.{self.token}.tmp"
        tmp.write_text(json.dumps({**self.me, "token": self.token, "run": run.key()}))
        try:
            for _ in range(2):  # the second try after a stale claim was moved aside
                try:
                    os.link(tmp, self._path(key))
                except FileExistsError:
                    if not self._drop_stale(key):
                        return False
                    continue
                self.held.add(key)
                return True
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def holder(self, run: RunSpec) -> str | None:
        """Who holds a live claim on ``run`` (None: nobody, or only a stale claim)."""
        path = self._path(claim_key(run))
        doc = self._read(path)
        if doc is None or self._stale(path, doc):
            return None
        return f"pid {doc.get('pid')} on {doc.get('host')}"

    def release(self, run: RunSpec) -> None:
        self._drop(claim_key(run))

    def release_all(self) -> None:
        for key in list(self.held):
            self._drop(key)

    def _drop(self, key: str) -> None:
        """Remove this sweep's claim (never another's that took a stale one over)."""
        if key not in self.held:
            return
        self.held.discard(key)
        doc = self._read(self._path(key))
        if doc is not None and doc.get("token") == self.token:
            self._path(key).unlink(missing_ok=True)

    def renew(self) -> None:
        """Keep this sweep's claims alive (every ``RENEW_S``; cheap to call more often)."""
        if time.monotonic() - self._renewed < RENEW_S:
            return
        self._renewed = time.monotonic()
        for key in self.held:
            with contextlib.suppress(OSError):
                os.utime(self._path(key))

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def _stale(self, path: Path, doc: dict[str, Any]) -> bool:
        if doc.get("host") == self.me["host"] and doc.get("boot_id") == self.me["boot_id"]:
            pid = doc.get("pid")
            return not isinstance(pid, int) or _started(pid) != doc.get("started")
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return True
        return age > self.lease_s

    def _drop_stale(self, key: str) -> bool:
        """Move a stale claim aside (one of two sweeps that both see it stale wins): True when
        the claim is gone now."""
        path = self._path(key)
        doc = self._read(path)
        if doc is None:
            # Unreadable: a claim being written, or a torn one; torn ones age out.
            try:
                return time.time() - path.stat().st_mtime > self.lease_s and self._move_aside(path, None)
            except OSError:
                return True  # gone meanwhile
        return self._stale(path, doc) and self._move_aside(path, doc.get("token"))

    def _move_aside(self, path: Path, token: str | None) -> bool:
        aside = path.with_name(f".{path.stem}.{self.token}.stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True
        moved = self._read(aside)
        if token is not None and (moved is None or moved.get("token") != token):
            # Another sweep took the stale claim over first: what was moved is its live claim.
            with contextlib.suppress(OSError):
                os.link(aside, path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True
