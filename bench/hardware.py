"""Hardware, version and commit labels for benchmark results (every number names its hardware)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path


def device_name() -> str:
    """'nvidia-h100-80gb-hbm3' on CUDA, 'cpu-2core-amd-epyc' on CPU: a file-name-safe hardware label."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        model = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"cpu-{os.cpu_count()}core-{model}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SSB_COMMIT", "nocommit")


def versions() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return info
