"""The one timing / memory / results helper of bench/.

Results layout (one file per suite, ``bench/results/<suite>.json``; ``BENCH_RESULTS_DIR`` overrides the folder)::

    {"suite": "train",
     "entries": {"toy/fused/cpu": {"params":  {"provider": "fused", "seq_len": 1024, ...},   # what was run
                                   "figures": {"tokens_per_s": 336.1, "peak_memory_mib": 812.0, ...},
                                   "meta":    {"device": "AMD EPYC, 2 cores (CPU)", "commit": "1210de1", ...}}}}

``figures`` holds only numbers; ``bench/check.py`` gates them by name and ``bench/report.py`` tabulates them.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hardware import metadata

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
_LOCK = threading.Lock()


def results_dir() -> Path:
    return Path(os.environ.get("BENCH_RESULTS_DIR") or BENCH_DIR / "results")


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename), so a killed run never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read one suite file; empty entries when absent. Raises ValueError naming the file when malformed."""
    path = Path(path)
    if not path.exists():
        return {"suite": path.stem, "entries": {}}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ValueError(f"{path}: expected {{'suite': ..., 'entries': {{...}}}}")
    return data


def record(suite: str, name: str, figures: dict[str, float | None], params: dict[str, Any] | None = None, *,
           device: Any = None, quick: bool | None = None, benchmark: Any = None) -> dict[str, Any]:  # fmt: skip
    """Merge one entry into ``results_dir()/<suite>.json`` (atomic write) and return it.

    ``figures`` are numbers (None = not measured here, dropped); ``params`` describe the run (``provider``,
    ``shape``, ``seq_len`` are what the report uses). With ``benchmark`` (the pytest-benchmark fixture) the entry
    also goes into ``benchmark.extra_info``, marked with ``bench_suite`` so readers do not count it twice.
    """
    figs = {k: float(v) for k, v in figures.items() if v is not None}
    entry = {"params": dict(params or {}), "figures": figs, "meta": {**metadata(device), "quick": quick}}
    path = results_dir() / f"{suite}.json"
    with _LOCK:
        data = load_results(path)
        data["suite"] = suite
        data["entries"][name] = entry
        write_json(path, data)
    if benchmark is not None:
        benchmark.extra_info.update(
            {**entry["params"], **figs, "device": entry["meta"]["device"], "bench_suite": suite}
        )
    return entry


# ---------------------------------------------------------------------------------------------- time
def sync(device: Any) -> None:
    """Wait for queued work on ``device`` (no-op on CPU) so wall-clock timings are honest."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, device: Any = "cpu") -> list[float]:
    """Wall-clock seconds of ``repeats`` synchronised calls of ``fn`` (no warm-up: call it first yourself)."""
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of the ``with`` block above what was in use at entry: ``.peak_bytes``, ``.peak_mib``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the kernel's VmHWM after resetting it
    (``/proc/self/clear_refs``), or a 1 ms RSS sampling thread where that is not allowed; glibc's free heap is
    handed back first so memory freed earlier is not silently re-used inside the block. For figures that must
    not depend on what ran before, measure in a fresh process (:func:`run_child`).
    """

    def __init__(self, device: Any = "cpu") -> None:
        import torch

        self.dev, self.peak_bytes, self.method = torch.device(device), 0, ""

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    def __enter__(self) -> PeakMemory:
        import torch

        self._thread = None
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self._base = torch.cuda.memory_allocated(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.method = "cuda.max_memory_allocated"
            return self
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._base = self._max = _rss()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "VmHWM"
        except OSError:
            self.method, self._stop = "rss-sampling", threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            peak = torch.cuda.max_memory_allocated(self.dev)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, _rss())
        else:
            status = Path("/proc/self/status").read_text().splitlines()
            peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
        self.peak_bytes = max(0, peak - self._base)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@contextlib.contextmanager
def peak_memory(device: Any = "cpu") -> Iterator[PeakMemory]:
    """``with peak_memory(dev) as m: ...`` then ``m.peak_mib``; see :class:`PeakMemory`."""
    with PeakMemory(device) as m:
        yield m


def run_child(script: str | Path, args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process; return the JSON object on its last stdout line.

    Raises RuntimeError with the tail of stderr when it fails or times out (a peer that cannot run says why).
    """
    cmd = [sys.executable, str(script), *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from e
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]
        raise RuntimeError(tail[0][-400:])
    return json.loads(lines[-1])
