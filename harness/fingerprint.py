"""The environment a run ran in, gathered by small named functions (as sacred does).

Two ids come out of it (docs/design.md, "Environments"):
- ``machine_id``: the physical machine as far as a process can see it: CPU vendor, family,
  model, stepping, microcode and flags, the kernel, the GPU model. A VM's model string alone
  ("AMD EPYC") cannot tell CPU generations apart; the flags and stepping can.
- ``environment_id``: the machine plus everything that picks the kernels a run executes:
  the software versions, the ISA torch and oneDNN dispatch to, the BLAS, the variables that
  steer them (``NUMERIC_ENV``), threads, device, matmul precision, autocast and the
  determinism switches. Same-seed runs with equal
  ``environment_id`` are a determinism test; with different ones, a cross-environment pair.

The run id includes ``environment_id``: the same run in another environment is another run.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.hashing import stable_hash

PACKAGES = ("torch", "torchvision", "anomalib", "lightning", "timm", "numpy", "scikit-learn")
# x86 CPU flags that decide which kernels torch and oneDNN can dispatch to.
ISA_FLAGS = (
    "sse4_1",
    "avx",
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)
# What each oneDNN ISA cap needs of the CPU (its own checks, by /proc/cpuinfo's names).
ONEDNN_NEEDS = {
    "SSE41": {"sse4_1"},
    "AVX": {"avx"},
    "AVX2": {"avx2"},
    "AVX2_VNNI": {"avx2", "avx_vnni"},
    "AVX2_VNNI_2": {"avx2", "avx_vnni", "avx_vnni_int8"},
    "AVX512_CORE": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "AVX512_CORE_VNNI": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
    "AVX512_CORE_BF16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"},
    "AVX10_1_512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16"},
    "AVX10_1_512_AMX": {"avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"},
    "AVX10_1_512_AMX_FP16": {"avx512f", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16"},
}
ATEN_NEEDS = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
IMAGE_ENV = "HARNESS_IMAGE"  # set by the project's container image (infra/Dockerfile): its tag
IMAGE_BASE_ENV = "HARNESS_IMAGE_BASE"  # the base image it was built on
IMAGE_ID_FILE = Path("/etc/ad-harness-image-id")  # what it installed, hashed by its build
# Variables that pick kernels or their order of operations, as the process was started
# with them (MKL's code path and conditional reproducibility, TF32 on Ampere and later).
# Not the thread counts (the run sets torch's), nor what the run itself sets (the cuBLAS
# workspace): the id must be the same before a run as in its record.
NUMERIC_ENV = (
    "ATEN_CPU_CAPABILITY",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
    "NVIDIA_TF32_OVERRIDE",
)


def numeric_env() -> dict[str, str]:
    """The ``NUMERIC_ENV`` variables this process has."""
    return {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}


@cache
def cpu_info() -> dict[str, Any]:
    """The first processor's identity from /proc/cpuinfo (empty fields where unreadable)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor only: they are the same on one machine
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = sorted(set((fields.get("flags") or fields.get("Features") or "").split()))
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id") or fields.get("CPU implementer"),
        "family": fields.get("cpu family") or fields.get("CPU architecture"),
        "model_number": fields.get("model") or fields.get("CPU part"),
        "stepping": fields.get("stepping") or fields.get("CPU revision"),
        "microcode": fields.get("microcode"),
        "flags_sha256": stable_hash(flags, 16) if flags else None,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "flags": flags,
    }


def cpu_model() -> str:
    return str(cpu_info()["model"])


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


@cache
def cuda_facts(device: str) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu_name": None,
        "gpu_capability": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "driver": None,
    }
    if device.startswith("cuda"):
        dev = torch.device(device)
        facts["gpu_name"] = torch.cuda.get_device_name(dev)
        facts["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        facts["driver"] = _nvidia_driver()
    return facts


def _nvidia_driver() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(\S+)", text)
    return found.group(1) if found else None


@cache
def torch_build() -> dict[str, Any]:
    """How this torch was built and what it dispatches to here (fixed once torch has loaded)."""
    import torch

    config = torch.__config__.show()
    onednn = re.search(r"(?:oneDNN|MKL-DNN) (v[\d.]+)", config)
    mkl = re.search(r"Math Kernel Library Version (\S+)", config)
    build = dict(re.findall(r"\b(BLAS_INFO|LAPACK_INFO)=(\w+)", config))
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability().lower(),
        "onednn_version": onednn.group(1) if onednn else None,
        "onednn_available": torch.backends.mkldnn.is_available(),
        "onednn_isa": onednn_isa(),
        "mkl": mkl.group(1) if mkl and torch.backends.mkl.is_available() else None,
        "blas": build.get("BLAS_INFO"),
        "lapack": build.get("LAPACK_INFO"),
    }


def onednn_isa() -> str:
    """The ISA oneDNN dispatches to: the best the CPU has, capped by ``DNNL_MAX_CPU_ISA``
    (oneDNN's own rule; ``ONEDNN_MAX_CPU_ISA`` is its newer name)."""
    cap = (os.environ.get("DNNL_MAX_CPU_ISA") or os.environ.get("ONEDNN_MAX_CPU_ISA") or "ALL").upper()
    flags = set(cpu_info()["flags"])
    names = list(ONEDNN_NEEDS)
    allowed = names if cap == "ALL" or cap not in names else names[: names.index(cap) + 1]
    return next((isa for isa in reversed(allowed) if ONEDNN_NEEDS[isa] <= flags), "none")


def check_requested(requested: dict[str, Any]) -> None:
    """Refuse a variant this process cannot honour: torch falls back silently from an ISA
    the CPU lacks, so the effective setting is compared with the requested one."""
    flags = set(cpu_info()["flags"])
    for key, value, needs in (
        ("aten_cpu_capability", requested.get("aten_cpu_capability"), ATEN_NEEDS),
        ("onednn_max_isa", requested.get("onednn_max_isa"), ONEDNN_NEEDS),
    ):
        if value in needs and not needs[value] <= flags:
            raise HarnessError(
                f"{key}={value}: this CPU ({cpu_model()}) lacks {', '.join(sorted(needs[value] - flags))}"
            )
    aten, isa = requested.get("aten_cpu_capability"), requested.get("onednn_max_isa")
    build = torch_build()
    if aten is not None and build["cpu_capability"] != aten:
        raise HarnessError(
            f"aten_cpu_capability={aten} was asked for, but torch dispatches to {build['cpu_capability']} "
            "(ATEN_CPU_CAPABILITY must be set before torch loads)"
        )
    if isa is not None and build["onednn_isa"] != isa and isa != "ALL":
        raise HarnessError(f"onednn_max_isa={isa} was asked for, but oneDNN dispatches to {build['onednn_isa']}")


def machine(device: str) -> dict[str, Any]:
    """The physical machine (and GPU) a run is on; ``machine_id`` hashes it."""
    cpu = {k: v for k, v in cpu_info().items() if k != "flags"}
    cuda = cuda_facts(device)
    facts = {"cpu": cpu, "kernel": platform.release(), **{k: cuda[k] for k in ("gpu_name", "gpu_capability")}}
    return {**facts, "machine_id": stable_hash(facts, 12)}


def image() -> dict[str, str | None] | None:
    """The project's container image this process runs in, or None outside one.

    ``tag`` and ``base`` are build arguments; ``content_id`` is a hash the build takes of what it
    installed (OS packages, interpreter, every file of the Python environment), so two images
    under one tag, or one image under two tags, are told apart by what they hold.
    """
    tag = os.environ.get(IMAGE_ENV)
    if tag is None:
        return None
    try:
        content_id: str | None = IMAGE_ID_FILE.read_text().strip() or None
    except OSError:
        content_id = None
    return {"tag": tag, "base": os.environ.get(IMAGE_BASE_ENV), "content_id": content_id}


def environment_id(device: str, settings: dict[str, Any]) -> str:
    """The execution environment a run with these ``settings`` gets in this process (what the
    run id includes): machine, software, the ISA dispatched to, the run's settings, and the
    container image's content (only inside one: ids outside images are as before)."""
    cuda = cuda_facts(device)
    software = {"python": sys.version.split()[0], **package_versions()}
    software |= {k: cuda[k] for k in ("cuda", "cudnn", "driver")}
    build = torch_build()
    parts: list[Any] = [machine(device)["machine_id"], software, build, numeric_env(), settings]
    img = image()
    if img is not None:
        parts.append({"image": img["content_id"]})
    return stable_hash(parts, 12)


def fingerprint(
    device: str, settings: dict[str, Any], variant: str | None, requested: dict[str, Any]
) -> dict[str, Any]:
    """Everything about where a run ran that could change its numbers.

    ``settings`` are the run's effective execution settings (threads, device, matmul precision,
    oneDNN on or off, autocast, deterministic); ``variant`` and ``requested`` the study's
    environment and what it asked for.
    """
    cuda = cuda_facts(device)
    cpu = cpu_info()
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **package_versions(),
        **cuda,
        "device": device,
        "cpu_model": cpu["model"],
        "cpu_count": os.cpu_count(),
        "threads": settings["threads"],
        "determinism": determinism_flags(),
        "harness_commit": harness_commit(),
        "image": image(),
        **machine(device),
        "torch_build": torch_build(),
        "numeric_env": numeric_env(),
        "execution": settings,
        "variant": variant,
        "requested": requested,
        "environment_id": environment_id(device, settings),
    }


def determinism_flags() -> dict[str, Any]:
    import torch

    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
