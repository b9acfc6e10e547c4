"""What every stage of bench/gpu.sh shares (bench/gpu_stages.py runs them): the plan of shapes, the device and
its slug, ``.peers/``, and ``Stage``: one stage's recorder, clock and device, with guarded items (a skip when the
time left cannot cover one, an error record when one raises) and ``measure`` (first call, timed rounds, peak
extra memory on CUDA). Also the shared inputs: bench/shapes.py's factory, row slices and hard labels.

No torch at import; bench/ must be on sys.path (bench/gpu_stages.py puts it there).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd_gpu import Clock, Recorder, small_mode

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass(frozen=True)
class Plan:
    """Shapes of one run: the checks at ``check_n`` rows (confident students: ``regime_n`` rows whose extra
    one-hot units make up H), timings at each of ``ns``."""

    h: int
    v: int
    k: int
    temperature: float
    check_n: int
    regime_n: int
    ns: tuple[int, ...]
    rounds: int


def plan() -> Plan:
    from shapes import QWEN_H, QWEN_V

    if small_mode():  # spans several tiles of the row kernels in every dimension; seconds under the interpreter
        return Plan(h=40, v=700, k=8, temperature=2.0, check_n=16, regime_n=12, ns=(4, 8, 16), rounds=1)
    return Plan(h=QWEN_H, v=QWEN_V, k=64, temperature=2.0, check_n=2048, regime_n=128, ns=(8192, 16384, 32768),
                rounds=10)  # fmt: skip


# ------------------------------------------------------------------------------------------------------ env
def device():
    import torch

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")


def slug(dev) -> str:
    from hardware import device_slug

    if dev.type == "cuda":
        return device_slug(dev)
    return "cpu-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"


PEERS_DIR = Path(os.environ.get("SSB_PEERS_DIR") or REPO / ".peers")  # as bench/kd_providers.py


def use_peers_dir() -> None:
    """Make ``.peers/`` importable, after everything else (torch still comes from the environment)."""
    if PEERS_DIR.is_dir() and str(PEERS_DIR) not in sys.path:
        sys.path.append(str(PEERS_DIR))


# ------------------------------------------------------------------------------------------------- helpers
class Stage:
    """One stage's recorder, clock and device, with guarded items."""

    def __init__(self, name: str):
        import torch

        self.name, self.torch = name, torch
        self.rec = Recorder(os.environ["SSB_GPU_JSONL"], os.environ["SSB_GPU_RUN"], name)
        self.clock = Clock.from_env()
        self.dev = device()
        self.plan = plan()
        self.walls: dict[str, tuple[int, float]] = {}  # provider -> (n, wall seconds of its last item)
        if os.environ.get("SSB_GPU_STALL") == name:  # tests: the deadline must kill a stage that hangs
            self.rec.add("result", name="stall", note="SSB_GPU_STALL: hanging until killed")
            print("stalling until killed (SSB_GPU_STALL)", flush=True)
            time.sleep(10**6)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def predicted(self, provider: str, n: int) -> float:
        """Seconds the next item of ``provider`` at ``n`` rows should take, from its last one (0: unknown)."""
        if provider not in self.walls:
            return 0.0
        n0, wall = self.walls[provider]
        return wall * max(n / n0, 1.0) if n0 > 0 else wall

    def item(self, name: str, provider: str, n: int, fn: Callable[[], dict]) -> dict | None:
        """Run one item: skipped (recorded) when it cannot fit, an error recorded when it raises."""
        need = self.predicted(provider, n)
        left = self.clock.left()
        if need > left:
            self.rec.add("skip", name=name, provider=provider, n=n,
                         reason=f"budget: ~{need:.0f} s needed, {left:.0f} s left")  # fmt: skip
            print(f"skip {self.name} {name}: budget (~{need:.0f} s needed, {left:.0f} s left)", flush=True)
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # OOM, a peer's failure, a kernel error: recorded, never hidden
            self.rec.add("error", name=name, provider=provider, n=n, error=f"{type(e).__name__}: {e}"[:2000],
                         traceback=traceback.format_exc()[-3000:])  # fmt: skip
            print(f"ERROR {self.name} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            out = None
        finally:
            if self.dev.type == "cuda":
                self.torch.cuda.empty_cache()
        self.walls[provider] = (n, time.perf_counter() - t0)
        return out

    def measure(self, fn: Callable[[], Any], rounds: int, memory: bool = True) -> dict:
        """First call (compile, cuBLAS init: ``first_call_s``), one more warm-up on CUDA, then timed rounds
        (CUDA events; perf_counter on CPU), fewer when the time left asks. Peak extra memory on CUDA: max
        allocated during one more call minus what was allocated before it (the inputs; ``fn.hidden``'s old
        gradient is dropped first, so the dh it returns counts as extra)."""
        torch = self.torch
        cuda = self.dev.type == "cuda"
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t0
        warm = first
        if cuda:
            t0 = time.perf_counter()
            fn()
            self.sync()
            warm = time.perf_counter() - t0
        r = max(1, min(rounds, int(0.25 * max(self.clock.left(), 0.0) / max(warm, 1e-4))))
        times = []
        for _ in range(r):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        out = {"ms_min": min(times) * 1e3, "ms_median": statistics.median(times) * 1e3, "rounds": r,
               "first_call_s": round(first, 4), "compile_s": round(max(first - statistics.median(times), 0.0), 4),
               "timer": "cuda events" if cuda else "perf_counter"}  # fmt: skip
        if memory and cuda:
            hidden = getattr(fn, "hidden", None)
            if hidden is not None:
                hidden.grad = None  # the base is the inputs alone: the new dh counts as extra
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            out["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        return out

    def shape_fields(self, n: int, dtype: str = "bfloat16") -> dict:
        p = self.plan
        return {"n": n, "h": p.h, "v": p.v, "k": p.k, "dtype": dtype, "temperature": p.temperature}


def kd_inputs(st: Stage, n: int, dtype: str = "bfloat16", seed: int = 0) -> dict:
    """bench/shapes.py's shared factory (CPU generator, then the device) at ``n`` rows."""
    from shapes import KDShape, make_kd_inputs

    p = st.plan
    return make_kd_inputs(KDShape(f"n{n}", n=n, h=p.h, v=p.v, k=p.k, dtype=dtype, temperature=p.temperature),
                          st.dev, seed=seed)  # fmt: skip


def rows(x: dict, n: int) -> dict:
    """The first ``n`` rows of an input dict, with a fresh leaf ``hidden``."""
    out = {k: (t[:n] if k not in ("weight", "temperature") else t) for k, t in x.items()}
    out["hidden"] = x["hidden"][:n].detach().requires_grad_(True)
    return out


def labels_for(x: dict) -> Any:
    """Hard labels: the teacher's top-1 on two rows in three, another id elsewhere (some inside K, some not)."""
    torch = __import__("torch")
    ids = x["topk_ids"]
    n, v = ids.shape[0], x["weight"].shape[0]
    g = torch.Generator().manual_seed(3)
    other = torch.randint(0, v, (n,), generator=g).to(ids.device)
    return torch.where(torch.arange(n, device=ids.device) % 3 == 2, other, ids[:, 0]).long()
