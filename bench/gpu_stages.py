"""The stages of bench/gpu.sh, one per process: ``python bench/gpu_stages.py STAGE`` (bench/kd_gpu.py runs them,
passing the deadline, run id and results file in SSB_GPU_* variables).

Only the public API of ssb_kernels (``sparse_kd_loss``, ``sparse_kd_ce_loss``, ``topk_logprobs`` with
impl="triton" / "chunked" / "eager"), bench/shapes.py (the shared input factory) and tests/kernel_cases.py's
``make_regime`` (the confident students). Every result is a record in the .jsonl the moment it exists; an item
that cannot fit in the time left is recorded as a skip, one that fails as an error (OOM included), and the stage
goes on.

Stages (bench/kd_gpu.py's STAGES):
  env          device, slug, versions, what is installed (printed as JSON for the driver)
  correctness  sparse_kd_loss in bf16 then fp16 (forward KL, reverse KL, JSD on random masked rows; a confident
               student, lead 20 and 60), sparse_kd_ce_loss, and topk_logprobs, all impl="triton", against
               impl="eager" in float64 on exactly the rounded inputs: per-row loss relative error and the worst
               row's dh relative error; top-k ids agreement with ties aside. Verdict limits are the issue's targets
               (loss 2e-3 per row, worst-row dh 3e-2, ids 99%); the tests' strict limits are recorded beside them.
  kd / kd_ce   fwd+bwd of impl="triton" (kd: then "chunked") against the bf16 bare-GEMM floor (two torch.mm:
               logits h W^T, then the gradient product S W: 4NHV FLOPs) at each N; peak extra memory
  peers        Liger's fused linear CE, Apple's Cut Cross-Entropy (CUDA only), torch's linear_cross_entropy
  topk         topk_logprobs capture against the one-GEMM floor (2NHV)
  pytest       pytest -m gpu tests/test_kernels_triton.py
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO / "tests"))  # kernel_cases.make_regime

from kd_gpu import Clock, Recorder, small_mode  # noqa: E402

PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # dense bf16 tensor-core peaks (as kd_providers)
LOSS_TARGET, DH_TARGET, IDS_TARGET = 2e-3, 3e-2, 0.99  # the targets: the verdict
LOSS_STRICT = 1e-5  # tests/test_kernels_triton.py: loss per row; dh 2u plus what rounding the truth costs
UNIT = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}
TIME_TARGET = 1.4  # fwd+bwd / floor at N = 8k (issue 25)


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


OPTIONAL = {  # import name -> what lacks without it
    "pytest": "the pytest stage",
    "pytest_benchmark": "bench/test_bench_*.py suites (not run by gpu.sh)",
    "hypothesis": "the property test inside the pytest stage",
    "liger_kernel": "the Liger peer",
    "cut_cross_entropy": "the CCE peer",
    "vllm": "nothing here (rollouts)",
}


def ssb_dependencies() -> list[str]:
    """Distributions ssb itself needs (pyproject.toml) that are not installed: gpu.sh never imports ssb."""
    try:
        import tomllib

        deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    except (OSError, KeyError, ValueError):
        return []
    missing = []
    for d in deps:
        name = re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0]
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def stage_env() -> int:
    """Print one JSON line for the driver: device, slug, versions, installed packages."""
    import json

    import torch
    from hardware import metadata, versions

    dev = device()
    use_peers_dir()
    info: dict[str, Any] = {"slug": slug(dev), **metadata(dev), "versions_dict": versions()}
    info["versions"] = f"torch {torch.__version__}, triton {info['versions_dict'].get('triton')}"
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info["gpu"] = {"name": p.name, "total_mib": p.total_memory // 2**20, "sms": p.multi_processor_count,
                       "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}  # fmt: skip
        info["versions"] += f", cuda {torch.version.cuda}"
        try:
            q = "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit"
            smi = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"unavailable: {e}"
    try:
        import ssb_kernels

        info["ssb_kernels"] = str(Path(ssb_kernels.__file__).parent)
    except Exception as e:
        info["ssb_kernels"] = f"import failed: {type(e).__name__}: {e}"
    info["peers_dir"] = str(PEERS_DIR) if PEERS_DIR.is_dir() else None  # make bench-peers installs them there
    have = {m: importlib.util.find_spec(m) is not None for m in OPTIONAL}
    info["have"] = have
    info["missing"] = [f"{m} ({OPTIONAL[m]})" for m, ok in have.items() if not ok]
    deps = ssb_dependencies()
    if deps:
        info["missing"].append(f"ssb's own dependencies ({', '.join(deps)}): not needed, ssb is not imported")
    print(json.dumps(info), flush=True)
    return 0


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


# ---------------------------------------------------------------------------------------------- correctness
def row_rel(got, truth):
    """(N,) relative error of each row of a 2-D tensor (entries of a 1-D one) against the float64 truth."""
    g, t = got.double().reshape(got.shape[0], -1), truth.reshape(truth.shape[0], -1)
    return (g - t).norm(dim=1) / t.norm(dim=1).clamp(min=1e-300)


def loss_rows(got, truth) -> float:
    """Worst row's loss error relative to |truth| (plus 1e-7 of the largest row, for rows whose loss is ~0)."""
    err = (got.double() - truth).abs()
    scale = truth.abs() + 1e-7 * float(truth.abs().max())
    return float((err / scale.clamp(min=1e-300)).nan_to_num(nan=float("inf")).max())


def dh_rows(got, truth, dtype) -> dict:
    """Worst live row's dh relative error, what rounding that row of the truth to ``dtype`` costs, and whether
    masked rows (truth 0) came back exactly 0."""
    torch = __import__("torch")
    live = truth.norm(dim=1) > 0
    rr = row_rel(got, truth).nan_to_num(nan=float("inf"))
    rr_live = torch.where(live, rr, torch.full_like(rr, -1.0))
    worst = int(rr_live.argmax())
    out_round = row_rel(truth.to(getattr(torch, dtype)), truth)
    strict = 2 * UNIT[dtype] + out_round
    return {"dh_rel_worst": float(rr_live.max()), "dh_worst_row": worst, "dh_out_round": float(out_round[worst]),
            "dh_strict_ok": bool((rr[live] <= strict[live]).all()),
            "masked_rows": int((~live).sum()), "masked_dh_zero": bool((got[~live] == 0).all())}  # fmt: skip


def run_kd(impl: str, h, w, ids, lp, c, mask, t: float, divergence: str):
    torch = __import__("torch")
    import ssb_kernels

    x = h.detach().clone().requires_grad_(True)
    loss = ssb_kernels.sparse_kd_loss(x, w, ids, lp, lse_t=c, mask=mask, temperature=t, reduction="none",
                                      impl=impl, divergence=divergence)  # fmt: skip
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)  # a non-uniform upstream
    (loss * up).sum().backward()
    return loss.detach(), x.grad


def check_kd(st: Stage, name: str, inputs: tuple, dtype: str, divergence: str) -> dict:
    torch = st.torch
    h, w, ids, lp, c, mask = inputs
    dt = getattr(torch, dtype)
    hh, ww = h.to(dt), w.to(dt)
    t = st.plan.temperature
    truth = run_kd("eager", hh.double(), ww.double(), ids, lp.double(), c.double(), mask, t, divergence)
    got = run_kd("triton", hh, ww, ids, lp, c, mask, t, divergence)
    finite = bool(torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all())
    out = {"name": name, "dtype": dtype, "divergence": divergence, "n": h.shape[0], "h": h.shape[1],
           "v": w.shape[0], "k": ids.shape[1], "finite": finite, "device": got[1].device.type,
           "dh_dtype": str(got[1].dtype)}  # fmt: skip
    out["loss_rel_max"] = loss_rows(got[0], truth[0])
    out.update(dh_rows(got[1], truth[1], dtype))
    out["loss_strict_ok"] = out["loss_rel_max"] <= LOSS_STRICT
    out["limits"] = {"loss": LOSS_TARGET, "dh": DH_TARGET}
    out["ok"] = bool(finite and out["loss_rel_max"] <= LOSS_TARGET and out["dh_rel_worst"] <= DH_TARGET
                     and out["masked_dh_zero"] and out["device"] == st.dev.type and got[1].dtype == dt)  # fmt: skip
    return out


def check_kd_ce(st: Stage, inputs: tuple, dtype: str) -> dict:
    torch = st.torch
    import ssb_kernels

    h, w, ids, lp, c, mask = inputs
    dt = getattr(torch, dtype)
    labels = labels_for({"topk_ids": ids, "weight": w})
    labels[1::4] = -1  # ignored by CE
    res = {}
    for impl, hh, ww, lpp, cc in (("eager", h.to(dt).double(), w.to(dt).double(), lp.double(), c.double()),
                                  ("triton", h.to(dt), w.to(dt), lp, c)):  # fmt: skip
        x = hh.detach().clone().requires_grad_(True)
        kd, ce = ssb_kernels.sparse_kd_ce_loss(x, ww, ids, lpp, labels, lse_t=cc, mask=mask, reduction="none",
                                               temperature=st.plan.temperature, impl=impl)  # fmt: skip
        up = torch.linspace(0.5, 1.5, kd.numel(), dtype=kd.dtype, device=kd.device)
        (kd * up + 0.5 * ce * up.flip(0)).sum().backward()
        res[impl] = (kd.detach(), ce.detach(), x.grad)
    (tk, tc, td), (gk, gc, gd) = res["eager"], res["triton"]
    finite = bool(torch.isfinite(gk).all() and torch.isfinite(gc).all() and torch.isfinite(gd).all())
    out = {"name": "kd_ce-forward_kl", "dtype": dtype, "n": h.shape[0], "finite": finite,
           "loss_rel_max": loss_rows(gk, tk), "ce_rel_max": loss_rows(gc, tc), **dh_rows(gd, td, dtype)}  # fmt: skip
    out["loss_strict_ok"] = max(out["loss_rel_max"], out["ce_rel_max"]) <= LOSS_STRICT
    out["ok"] = bool(finite and out["loss_rel_max"] <= LOSS_TARGET and out["ce_rel_max"] <= LOSS_TARGET
                     and out["dh_rel_worst"] <= DH_TARGET and out["masked_dh_zero"])  # fmt: skip
    return out


def check_topk(st: Stage, h, w, dtype: str) -> dict:
    """topk_logprobs(impl="triton") vs eager float64 on the same rounded inputs. An id counts as agreeing, ties
    aside, when its true log-prob is within 1e-4 of the true k-th (logits are fp32 sums; neighbours that close
    are ties). Values: the true log-probs of the returned ids; c_T: against the truth at each temperature."""
    torch = st.torch
    import ssb_kernels

    dt = getattr(torch, dtype)
    k, temps = st.plan.k, (1.0, st.plan.temperature)
    hh, ww = h.detach().to(dt), w.to(dt)
    h64, w64 = hh.double(), ww.double()
    t_ids, t_lp, t_c = ssb_kernels.topk_logprobs(h64, w64, k, temperatures=temps, impl="eager")
    ids, lp, c = ssb_kernels.topk_logprobs(hh, ww, k, temperatures=temps, impl="triton")
    finite = bool(torch.isfinite(lp).all() and torch.isfinite(c).all())
    exact = float((ids[:, :, None] == t_ids[:, None, :]).any(-1).double().mean())
    n = h.shape[0]
    s_top = (h64 * w64[t_ids[:, 0]]).sum(-1)
    lse = s_top - t_lp[:, 0].double()  # LSE of the row's logits, from the true top-1
    true_lp = torch.empty(ids.shape, dtype=torch.float64, device=ids.device)
    for r0 in range(0, n, 256):  # (rows, k, H) in float64, 256 rows at a time
        sl = slice(r0, r0 + 256)
        true_lp[sl] = torch.einsum("nh,nkh->nk", h64[sl], w64[ids[sl].clamp(0, w.shape[0] - 1)]) - lse[sl, None]
    kth = t_lp[:, -1].double()
    distinct = bool((ids.sort(-1).values.diff(dim=-1) != 0).all()) if k > 1 else True
    agree = float((true_lp >= kth[:, None] - 1e-4).double().mean()) if distinct else 0.0
    lp_err = float((lp.double() - true_lp).abs().max())
    c_err = float((c.double() - t_c.double()).abs().max())
    out = {"name": "topk", "dtype": dtype, "n": n, "k": k, "finite": finite, "ids_exact": exact,
           "ids_agree_ties_aside": agree, "distinct_ids": distinct, "logprob_abs_err": lp_err,
           "lse_t_abs_err": c_err, "limits": {"ids": IDS_TARGET, "logprob": 1e-3, "lse_t": 1e-3}}  # fmt: skip
    out["ok"] = bool(finite and distinct and agree >= IDS_TARGET and lp_err <= 1e-3 and c_err <= 1e-3)
    return out


def stage_correctness() -> int:
    st = Stage("correctness")
    p = st.plan
    from kernel_cases import make_regime

    def regime(lead: float, tail: float) -> tuple:  # h + regime_n one-hot units = H; built on the CPU
        t0 = time.perf_counter()
        hid, w, ids, lp, c = make_regime(p.regime_n, p.h - p.regime_n, p.v, p.k, lead, tail, p.temperature, 1)
        print(f"make_regime lead {lead:.0f}: {time.perf_counter() - t0:.1f} s", flush=True)
        return (*(t.to(st.dev) for t in (hid, w, ids, lp, c)), None)

    # the confident students take CPU seconds at Qwen shapes: built in threads (torch releases the GIL) while the
    # random inputs are made and checked
    pool = ThreadPoolExecutor(max_workers=2)
    leads = ((20.0, 0.4), (60.0, 0.0))
    regimes = {f"lead{lead:.0f}-tail{tail:g}": pool.submit(regime, lead, tail) for lead, tail in leads}
    x = kd_inputs(st, p.check_n, dtype="float32", seed=1)
    mask = x["mask"].clone()
    mask[::5] = False  # masked rows: their loss and dh must be exactly 0
    rand = (x["hidden"].detach(), x["weight"], x["topk_ids"], x["topk_logprobs"], x["lse_t"], mask)
    results = []

    def case(name, fn, provider):
        r = st.item(name, provider, 0, fn)
        if r is not None:
            r["name"] = name
            st.rec.add("result", **r)
            keys = ("loss_rel_max", "ce_rel_max", "dh_rel_worst", "ids_agree_ties_aside", "logprob_abs_err")
            figs = [f"{k} {r[k]:.3g}" for k in keys if isinstance(r.get(k), float)]
            print(f"{'ok ' if r['ok'] else 'BAD'} {name}: {', '.join(figs)}", flush=True)
        results.append((name, r))

    for dtype in ("bfloat16", "float16"):
        for div in ("forward_kl", "reverse_kl", "jsd"):
            case(f"{dtype}/{div}", lambda d=dtype, v=div: check_kd(st, f"{d}/{v}", rand, d, v), "kd")
        case(f"{dtype}/kd_ce", lambda d=dtype: check_kd_ce(st, rand, d), "kd_ce")
        case(f"{dtype}/topk", lambda d=dtype: check_topk(st, rand[0], rand[1], d), "topk")
        for label, fut in regimes.items():
            case(f"{dtype}/confident-{label}", lambda d=dtype, f=fut: check_kd(st, "", f.result(), d, "forward_kl"),
                 "kd")  # fmt: skip
    pool.shutdown(wait=False)
    bad = [name for name, r in results if r is None or not r.get("ok")]
    st.rec.add("verdict", ok=not bad, failed=bad, cases=len(results),
               limits={"loss_rel": LOSS_TARGET, "dh_rel": DH_TARGET, "ids": IDS_TARGET})  # fmt: skip
    print(f"correctness: {'PASS' if not bad else 'FAIL ' + ', '.join(bad)}", flush=True)
    return 0


# -------------------------------------------------------------------------------------------------- timings
def floor_fn(x: dict, gemms: int = 2) -> Callable[[], None]:
    """The bare-GEMM floor: S = h W^T (N x V), then S W (N x H): 4NHV FLOPs (``gemms=1``: the logits only)."""
    torch = __import__("torch")
    h, w = x["hidden"].detach(), x["weight"]

    def call():
        s = torch.mm(h, w.t())
        if gemms == 2:
            torch.mm(s, w)

    return call


def kd_fn(x: dict, impl: str, ce: bool = False) -> Callable[[], None]:
    import ssb_kernels

    h, w, ids, lp, c, mask, t = (x[k] for k in ("hidden", "weight", "topk_ids", "topk_logprobs", "lse_t", "mask",
                                                "temperature"))  # fmt: skip
    labels = labels_for(x) if ce else None

    def call():
        h.grad = None
        if ce:
            kd, ce_loss = ssb_kernels.sparse_kd_ce_loss(h, w, ids, lp, labels, lse_t=c, mask=mask, temperature=t,
                                                        impl=impl)  # fmt: skip
            (kd + ce_loss).backward()
        else:
            ssb_kernels.sparse_kd_loss(h, w, ids, lp, lse_t=c, mask=mask, temperature=t, impl=impl).backward()

    call.hidden = h
    return call


def timed(st: Stage, name: str, provider: str, n: int, fn_of: Callable[[], Callable[[], None]], flops_passes: int,
          floor_ms: float | None = None, memory: bool = True) -> dict | None:  # fmt: skip
    """Time one provider at ``n`` rows and record it with its derived figures (tokens/s, TFLOP/s of the useful
    ``flops_passes`` x 2NHV, ratio to the floor, memory against the issue's target)."""
    p = st.plan

    def go():
        m = st.measure(fn_of(), p.rounds, memory)
        secs = m["ms_min"] / 1e3
        r = {"name": name, "provider": provider, **st.shape_fields(n), **m}
        r["tokens_per_s"] = round(n / secs, 1)
        r["tflops"] = round(2.0 * n * p.h * p.v * flops_passes / secs / 1e12, 3)
        peak = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in st.torch.cuda.get_device_name().lower()),
                    None) if st.dev.type == "cuda" else None  # fmt: skip
        if peak:
            r["fraction_of_peak"] = round(r["tflops"] / peak, 4)
        if floor_ms:
            r["floor_ms"] = floor_ms
            r["x_floor"] = round(m["ms_min"] / floor_ms, 3)
        if provider != "floor" and st.name in ("kd", "kd_ce"):
            r["mem_target_mib"] = round(n * p.h * 12 / 2**20 + 64, 1)
            if "peak_extra_mib" in r:
                r["mem_ok"] = r["peak_extra_mib"] <= r["mem_target_mib"]
            if floor_ms:
                r["time_target"] = TIME_TARGET
                r["time_ok"] = r["x_floor"] <= TIME_TARGET
        st.rec.add("result", **r)
        extra = f" {r['x_floor']:.2f}x floor" if floor_ms else ""
        mem = f" +{r['peak_extra_mib']:.0f} MiB" if "peak_extra_mib" in r else ""
        print(f"{st.name} {name}: {m['ms_min']:.2f} ms{extra}{mem} (first call {m['first_call_s']:.2f} s, "
              f"{m['rounds']} rounds)", flush=True)  # fmt: skip
        return r

    return st.item(name, provider, n, go)


def stage_kd(ce: bool = False) -> int:
    st = Stage("kd_ce" if ce else "kd")
    x = kd_inputs(st, max(st.plan.ns))
    impls = ("triton",) if ce else ("triton", "chunked")  # chunked (torch row step) last: the lowest value
    floors = {}
    for impl in impls:
        for n in st.plan.ns:
            xs = rows(x, n)
            if n not in floors:
                f = timed(st, f"n{n}/floor", "floor", n, lambda xs=xs: floor_fn(xs), 2, memory=False)
                floors[n] = f["ms_min"] if f else None
            timed(st, f"n{n}/{impl}", impl, n, lambda xs=xs, i=impl: kd_fn(xs, i, ce), 2, floors[n])
    return 0


def peer_fns(st: Stage) -> dict[str, Callable[[dict], Callable[[], None]] | str]:
    """Peers by name: a factory of the timed call, or why it cannot run here."""
    torch = st.torch
    use_peers_dir()
    out: dict[str, Any] = {}
    cuda = st.dev.type == "cuda"

    def hard(call):  # fwd+bwd of a hard-label loss on the teacher's top-1 / other labels
        def make(x):
            h, w, y = x["hidden"], x["weight"], labels_for(x)

            def fn():
                h.grad = None
                loss = call(h, w, y)
                (loss[0] if isinstance(loss, tuple) else loss).backward()

            fn.hidden = h
            return fn

        return make

    if importlib.util.find_spec("liger_kernel") is None:
        out["liger-flce"] = "liger_kernel is not importable (make bench-peers installs it into .peers/)"
    elif not cuda:
        out["liger-flce"] = "Liger's fused linear CE is Triton on CUDA: not run on CPU"
    else:
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as Liger

            out["liger-flce"] = hard(lambda h, w, y: Liger.apply(h, w, y))
        except Exception as e:
            out["liger-flce"] = f"liger_kernel's fused linear CE failed to import: {type(e).__name__}: {e}"
    if importlib.util.find_spec("cut_cross_entropy") is None:
        out["cce"] = "cut_cross_entropy is not importable (make bench-peers installs it into .peers/)"
    elif not cuda:
        out["cce"] = "CCE's kernels are Triton on CUDA (its CPU path compiles with inductor): not run on CPU"
    else:
        try:
            from cut_cross_entropy import linear_cross_entropy

            out["cce"] = hard(lambda h, w, y: linear_cross_entropy(h, w, y, impl="cce"))
        except Exception as e:
            out["cce"] = f"cut_cross_entropy failed to import: {type(e).__name__}: {e}"
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        out["torch-lce"] = hard(torch.nn.functional.linear_cross_entropy)
    else:
        out["torch-lce"] = f"torch {torch.__version__} has no F.linear_cross_entropy"
    return out


def stage_peers() -> int:
    st = Stage("peers")
    peers = peer_fns(st)
    for name, why in peers.items():
        if isinstance(why, str):
            st.rec.add("skip", name=name, provider=name, reason=why)
            print(f"skip peer {name}: {why}", flush=True)
    live = {k: v for k, v in peers.items() if not isinstance(v, str)}
    if not live:
        return 0
    x = kd_inputs(st, max(st.plan.ns))
    for n in st.plan.ns:
        xs = rows(x, n)
        f = timed(st, f"n{n}/floor", "floor", n, lambda xs=xs: floor_fn(xs), 2, memory=False)
        for name, make in live.items():
            timed(st, f"n{n}/{name}", name, n, lambda m=make, xs=xs: m(xs), 2, f["ms_min"] if f else None)
    return 0


def stage_topk() -> int:
    st = Stage("topk")
    import ssb_kernels

    p = st.plan
    x = kd_inputs(st, max(p.ns))
    floors = {}
    for impl in ("triton", "chunked"):
        for n in p.ns:
            h, w = x["hidden"][:n].detach(), x["weight"]
            if n not in floors:
                f = timed(st, f"n{n}/floor1", "floor1", n, lambda n=n: floor_fn(rows(x, n), 1), 1, memory=False)
                floors[n] = f["ms_min"] if f else None

            def make(h=h, w=w, i=impl):
                return lambda: ssb_kernels.topk_logprobs(h, w, p.k, temperatures=(1.0, p.temperature), impl=i)

            timed(st, f"n{n}/{impl}", impl, n, make, 1, floors[n])
    return 0


def stage_pytest() -> int:
    st = Stage("pytest")
    if importlib.util.find_spec("pytest") is None:
        st.rec.add("skip", name="pytest -m gpu", reason="pytest is not installed")
        print("skip: pytest is not installed", flush=True)
        return 0
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfE",
           "tests/test_kernels_triton.py"]  # fmt: skip
    left = st.clock.left() - 2.0
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(left, 1.0))
        text, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        text, rc = (out.decode(errors="replace") if isinstance(out, bytes) else out) + "\n(timed out)", None
    print(text[-4000:], flush=True)
    counts = {w: int(m) for m, w in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    st.rec.add("result", name="pytest -m gpu tests/test_kernels_triton.py", rc=rc, counts=counts,
               wall_s=round(time.perf_counter() - t0, 1), ok=rc in (0, 5), tail=text[-1500:])  # fmt: skip
    return 0


STAGE_FNS = {"env": stage_env, "correctness": stage_correctness, "kd": stage_kd, "kd_ce": lambda: stage_kd(True),
             "peers": stage_peers, "topk": stage_topk, "pytest": stage_pytest}  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in STAGE_FNS:
        print(f"usage: python bench/gpu_stages.py {{{'|'.join(STAGE_FNS)}}}", file=sys.stderr)
        sys.exit(2)
    sys.exit(STAGE_FNS[sys.argv[1]]())
