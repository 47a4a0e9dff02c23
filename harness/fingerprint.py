"""The environment a run ran in, gathered by small named functions (as sacred does).

``hardware_id`` hashes only the hardware part (device type, GPU and CPU model, thread
count): two identical nodes share it, so their same-seed runs count as a determinism test,
while software versions are compared separately by the checker.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from harness.hashing import stable_hash

PACKAGES = ("torch", "torchvision", "anomalib", "lightning", "timm", "numpy", "scikit-learn")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def harness_commit() -> str | None:
    """The git commit of the harness source, with ``+dirty`` for uncommitted changes."""
    src = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--", "harness"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def cuda_facts(device: str) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu_name": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if device.startswith("cuda"):
        facts["gpu_name"] = torch.cuda.get_device_name(torch.device(device))
    return facts


def determinism_flags() -> dict[str, Any]:
    import torch

    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def hardware_id(device: str, gpu_name: str | None, cpu: str, threads: int) -> str:
    return stable_hash({"device": device.split(":")[0], "gpu": gpu_name, "cpu": cpu, "threads": threads}, 12)


def local_hardware_id(device: str, threads: int) -> str:
    """This machine's ``hardware_id`` for a run on ``device`` with ``threads``."""
    return hardware_id(device, cuda_facts(device)["gpu_name"], cpu_model(), threads)


def fingerprint(device: str, threads: int) -> dict[str, Any]:
    """Everything about where a run ran that could change its numbers."""
    cuda = cuda_facts(device)
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **package_versions(),
        **cuda,
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "determinism": determinism_flags(),
        "harness_commit": harness_commit(),
        "hardware_id": local_hardware_id(device, threads),
    }
