"""GPU kernel suite without pytest: Triton correctness vs a float64 oracle, then timings of every provider.

``python bench/kd_gpu.py [--quick] [--out PATH]`` (bench/gpu.sh calls it). A correctness failure is fatal:
nothing is timed. Writes a pytest-benchmark-shaped
JSON ({"ssb", "machine_info", "benchmarks": [{"fullname", "stats": {"min", ...}, "extra_info"}]}) to
bench/results/<device>-<commit>.json, readable by bench/check.py and bench/report.py. Timings use CUDA
events, min over rounds after one warm-up (Triton compile time is reported as first_call_s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # kernel_cases.make_regime: the confident-student inputs

import ssb_kernels  # noqa: E402
from hardware import device_name, git_commit, versions  # noqa: E402
from kd_providers import PROVIDERS, figures, make_fn, skip_reason  # noqa: E402
from kernel_cases import make_regime  # noqa: E402
from shapes import KDShape, make_kd_inputs, shapes_for  # noqa: E402
from ssb_kernels.options import TopkOptions  # noqa: E402
from ssb_kernels.reference import topk_logprobs_eager  # noqa: E402

RTOL = {"float32": 1e-4, "bfloat16": 2 * 2.0**-8, "float16": 2 * 2.0**-11}  # as tests/test_kernels_triton.py


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def check_correctness(dev: torch.device, n: int = 1000, v: int = 32000, dtypes=("bfloat16", "float16", "float32")):
    """Triton loss and dh vs eager float64 on the same rounded inputs, all on the device, reduction "sum" (dh is
    O(1)), normwise relative: a random masked batch and confident students (lead 20 and 60); top-k vs float64.
    A case passes within RTOL plus what rounding the truth to the output dtype itself costs."""
    report = []
    shape = KDShape("check", n=n, h=256, v=v, k=64, temperature=2.0)
    cases = {"random": None, "lead20-tail0.4": (20.0, 0.4), "lead60-tail0": (60.0, 0.0)}
    for dtype in dtypes:
        dt = getattr(torch, dtype)
        for label, regime in cases.items():
            if regime is None:
                x = make_kd_inputs(KDShape(**{**shape.__dict__, "dtype": dtype}), dev, seed=1)
                x["mask"][::5] = False
                hid, w, ids, lp, c, mask = (x[key] for key in ("hidden", "weight", "topk_ids", "topk_logprobs",
                                                                "lse_t", "mask"))  # fmt: skip
            else:
                hid, w, ids, lp, c = (t.to(dev) for t in make_regime(n // 2, 256, v, 64, *regime, 2.0, 1))
                hid, w, mask = hid.to(dt), w.to(dt), None
            outs = {}
            for impl, cast in (("truth", torch.float64), ("triton", None)):
                h = hid.detach().to(cast or dt).requires_grad_(True)
                loss = ssb_kernels.sparse_kd_loss(h, w.to(cast or dt), ids, lp.to(cast or torch.float32), lse_t=c,
                                                  mask=mask, temperature=2.0, reduction="sum",
                                                  impl="eager" if impl == "truth" else impl)  # fmt: skip
                loss.backward()
                outs[impl] = (loss.detach(), h.grad)
            for i, name in enumerate(("loss", "dh")):
                t, got = outs["truth"][i], outs["triton"][i]
                out_round = _rel(t.to(got.dtype), t) if got.dtype != torch.float32 else 0.0
                err = _rel(got, t) if bool(torch.isfinite(got).all()) else float("inf")
                ok = err <= RTOL[dtype] + out_round and got.device.type == "cuda" and float(t.norm()) > 0
                verdict = "ok " if ok else "BAD"
                report.append(f"{verdict} sparse_kd {dtype} {label} {name}: normwise rel err {err:.3g} "
                              f"(limit {RTOL[dtype] + out_round:.3g})")  # fmt: skip
    g = torch.Generator(device="cpu").manual_seed(0)
    hid, w = torch.randn(n // 2, 256, generator=g).to(dev), (torch.randn(v, 256, generator=g) / 8).to(dev)
    truth = topk_logprobs_eager(hid.double(), w.double(), TopkOptions(k=64, temperatures=(1.0, 2.0)))
    got = ssb_kernels.topk_logprobs(hid, w, 64, temperatures=(1.0, 2.0), impl="triton")
    same = float((got[0] == truth[0]).float().mean())
    err = max(float((got[1].double() - truth[1]).abs().max()), float((got[2].double() - truth[2]).abs().max()))
    verdict = "ok " if same > 0.999 and err < 1e-3 else "BAD"
    report.append(f"{verdict} topk fp32: ids equal {same:.4f}, max err {err:.3g}")
    return report


def time_provider(shape: KDShape, provider: str, dev: torch.device, rounds: int) -> dict:
    x = make_kd_inputs(shape, dev)
    fn = make_fn(x, provider)
    t0 = time.perf_counter()
    fn()
    first_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    info = figures(shape, provider, min(times), first_s, peak)
    stats = {"min": min(times), "max": max(times), "mean": statistics.mean(times), "median": statistics.median(times),
             "rounds": rounds}  # fmt: skip
    name = f"test_bench_sparse_kd[{shape.name}-{provider}]"
    return {"name": name, "fullname": f"bench/test_bench_kd.py::{name}", "stats": stats, "extra_info": info}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kd_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"device {device_name()} | {versions()}", flush=True)
    report = check_correctness(dev)
    print("\n".join(report), flush=True)
    if any(line.startswith("BAD") for line in report):  # fatal, and before any timing: wrong kernels
        print("KERNEL CORRECTNESS FAILED: see the BAD lines above; no benchmark run", file=sys.stderr)
        return 1
    benches = []
    for shape in shapes_for(dev, args.quick):
        for provider in PROVIDERS:
            reason = skip_reason(shape, provider, dev)
            if reason:
                print(f"skip {shape.name} {provider}: {reason}", flush=True)
                continue
            try:
                b = time_provider(shape, provider, dev, rounds=3 if args.quick else 10)
            except Exception as e:  # a failing peer or an OOM is reported, never hidden
                print(f"FAIL {shape.name} {provider}: {type(e).__name__}: {e}", flush=True)
                continue
            finally:
                torch.cuda.empty_cache()
            benches.append(b)
            i = b["extra_info"]
            print(f"{shape.name:18s} {provider:8s} {b['stats']['min'] * 1e3:9.2f} ms  {i['tflops_4nhv']:7.1f} TFLOP/s "
                  f"peak +{i['peak_extra_mib']:.0f} MiB  first {i['first_call_s']:.1f} s", flush=True)  # fmt: skip
    out = args.out or HERE / "results" / f"{device_name()}-{git_commit()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "ssb": {"device": device_name(), "commit": git_commit(), "quick": args.quick, "correctness": report},
        "machine_info": {"device": device_name(), **versions()},
        "benchmarks": benches,
    }
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")
    return 1 if any(line.startswith("BAD") for line in report) else 0


if __name__ == "__main__":
    sys.exit(main())
