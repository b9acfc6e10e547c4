"""The timing stages of bench/gpu.sh (run by bench/gpu_stages.py); each item is recorded with its derived figures
(tokens/s, TFLOP/s of the useful FLOPs, ratio to the floor, peak extra memory against the issue's target).
  kd / kd_ce   fwd+bwd of impl="triton" (kd: then "chunked") against the bf16 bare-GEMM floor (two torch.mm:
               logits h W^T, then the gradient product S W: 4NHV FLOPs) at each N; peak extra memory
  peers        Liger's fused linear CE, Apple's Cut Cross-Entropy (CUDA only), torch's linear_cross_entropy
  topk         topk_logprobs capture against the one-GEMM floor (2NHV)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from gpu_common import Stage, kd_inputs, labels_for, rows, use_peers_dir

PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # dense bf16 tensor-core peaks (as kd_providers)

TIME_TARGET = 1.4  # fwd+bwd / floor at N = 8k (issue 25)


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
