"""A Docker engine of one test's own: its dockerd (data root, exec root, socket in a temp dir),
a Debian bookworm base made by debootstrap (cached as a tarball between runs, never needed),
and a teardown that stops what it started by PID and unmounts what it left.

Only what this machine allows: no registry (the base comes from debootstrap), the ``host`` and
``none`` networks, builds with ``--network host``. Debian's client (``/usr/bin/docker``) talks
to the daemon's BuildKit; the static client first on PATH has no buildx.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

DOCKER = "/usr/bin/docker"  # Debian's client: BuildKit (RUN --mount, secrets)
DOCKERD = "/usr/sbin/dockerd"
CACHE = Path(os.environ.get("AD_HARNESS_TEST_CACHE", "/var/cache/ad-harness-test"))
BASE_TAR = CACHE / "debian-bookworm-minbase.tar"
BASE_IMAGE = "ad-harness-test-base:bookworm"


def unavailable() -> str | None:
    """Why this machine cannot run the engine (None: it can), installing what is missing."""
    if os.geteuid() != 0:
        return "not root: dockerd, debootstrap and mounts need root"
    if not all(Path(p).exists() for p in (DOCKER, DOCKERD)) or shutil.which("debootstrap") is None:
        out = subprocess.run(
            ["apt-get", "install", "-y", "docker.io", "debootstrap"], capture_output=True, text=True, timeout=600
        )
        if out.returncode != 0:
            return f"apt-get install docker.io debootstrap failed: {out.stderr[-500:]}"
    return None


def mounts_under(root: Path) -> list[str]:
    """Mount points under ``root``, deepest first (the order to unmount them)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(f"{root}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


class Engine:
    """dockerd in a temp dir; ``with Engine() as e:`` stops it and everything in it at the end."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="adh-dk", dir="/tmp"))  # short: socket paths
        self.sock = self.dir / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "dockerd.log"

    def __enter__(self) -> Engine:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        argv = [DOCKERD, "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec")]
        argv += ["--pidfile", str(self.dir / "dockerd.pid"), "--host", f"unix://{self.sock}"]
        argv += ["--storage-driver=overlay2", "--iptables=false", "--ip6tables=false", "--bridge=none"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while self.docker(["version"], check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def docker(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "1", **(env or {})}
        out = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, env=full_env)
        if check and out.returncode != 0:
            raise RuntimeError(
                f"docker {' '.join(args[:3])}: exit {out.returncode}\n{out.stdout[-3000:]}{out.stderr[-5000:]}"
            )
        return out

    def base_image(self) -> str:
        """Debian bookworm (minbase) as an image: debootstrap once, the tarball cached after."""
        if not BASE_TAR.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            rootfs = Path(tempfile.mkdtemp(prefix="rootfs", dir=CACHE))
            try:
                subprocess.run(
                    ["debootstrap", "--variant=minbase", "bookworm", str(rootfs)],
                    capture_output=True,
                    check=True,
                    timeout=900,
                )
                part = BASE_TAR.with_suffix(f".{os.getpid()}.part")
                subprocess.run(["tar", "-C", str(rootfs), "-cf", str(part), "."], check=True, timeout=300)
                part.rename(BASE_TAR)  # whole or absent: a run cut short leaves no half cache
            finally:
                shutil.rmtree(rootfs, ignore_errors=True)
        self.docker(["import", str(BASE_TAR), BASE_IMAGE])
        return BASE_IMAGE

    def close(self, grace_s: float = 20.0) -> None:
        """Containers, the daemon (by PID), its mounts and its files: all gone, even half started."""
        if self.proc is not None and self.proc.poll() is None:
            ids = self.docker(["ps", "-aq"], check=False, timeout=30).stdout.split()
            if ids:
                self.docker(["rm", "-f", *ids], check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: dockerd and its containerd
                self.proc.wait(10)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # a containerd-shim it left, if any
        for point in mounts_under(self.dir):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.dir)], capture_output=True, timeout=600)

    def leftovers(self) -> list[str]:
        """What of this engine is still there: its process group, mounts, files."""
        left = [f"mount {p}" for p in mounts_under(self.dir)]
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 0)
                left.append(f"process group {self.proc.pid}")
        if self.dir.exists():
            left.append(f"dir {self.dir}")
        return left


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A directory over HTTP on loopback (builds on the host network reach it): its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
