"""Sparse top-k KD loss, forward + backward (grad to hidden, frozen head), across providers and shapes.

Run: ``pytest bench/test_bench_kd.py [--quick]`` (GPU: ``bash bench/gpu.sh``). Providers share one setup
factory (bench/shapes.py): ``eager`` (full logits), ``chunked`` (streaming PyTorch), ``triton`` (CUDA, or
CPU under TRITON_INTERPRET=1 on the tiny shape only), peers when installed (``liger`` fused linear CE,
``cce`` Apple's cut cross-entropy; same GEMM work, a different loss), and on CUDA ``gemm3``: the three bare
N x H x V GEMMs a fused KD must do (forward logits, backward recompute, grad input), the speed-of-light.
extra_info: tokens/s, TFLOP/s at 4NHV useful FLOPs (forward logits + grad input), fraction of peak (CUDA),
peak extra memory (CUDA allocator; on CPU, peak RSS growth of a fresh process), device and versions.
"""

from __future__ import annotations

import os
import time

import pytest
import ssb_kernels
import torch
from hardware import device_name, versions
from kd_peak import peak_extra_mb
from shapes import INTERPRETER_SHAPES, KDShape, make_kd_inputs, shapes_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # dense bf16, SXM datasheets
PROVIDERS = ("eager", "chunked", "triton", "liger", "cce", "gemm3")


def _quick(config) -> bool:
    try:
        return bool(config.getoption("--quick"))
    except ValueError:
        return False


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _kd_fn(x: dict, impl: str):
    def fn():
        x["hidden"].grad = None
        loss = ssb_kernels.sparse_kd_loss(
            x["hidden"], x["weight"], x["topk_ids"], x["topk_logprobs"], lse_t=x["lse_t"], mask=x["mask"], impl=impl
        )
        loss.backward()
        _sync()

    return fn


def _peer_fn(x: dict, provider: str):
    """A fused linear cross-entropy peer on the same hidden/head (target = each row's first teacher id)."""
    target = x["topk_ids"][:, 0].long()
    if provider == "liger":
        mod = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel not installed")
        loss_mod = mod.LigerFusedLinearCrossEntropyLoss()

        def call():
            return loss_mod(x["weight"], x["hidden"], target)
    else:
        cce = pytest.importorskip("cut_cross_entropy", reason="cut-cross-entropy not installed")

        def call():
            return cce.linear_cross_entropy(x["hidden"], x["weight"], target)

    def fn():
        x["hidden"].grad = None
        call().backward()
        _sync()

    return fn


def _gemm3_fn(x: dict):
    h, w = x["hidden"].detach(), x["weight"]

    def fn():
        z = h @ w.t()  # forward logits
        z2 = h @ w.t()  # backward recompute
        _ = z2 @ w  # grad input
        del z
        _sync()

    return fn


def _skip_reason(shape: KDShape, provider: str) -> str | None:
    if provider == "triton":
        if DEVICE.type != "cuda" and not INTERPRET:
            return "triton needs CUDA (or TRITON_INTERPRET=1 on CPU for the tiny interpreter shape)"
        if DEVICE.type != "cuda" and shape not in INTERPRETER_SHAPES:
            return "the Triton interpreter is only timed on the tiny interpreter shape"
    elif shape in INTERPRETER_SHAPES and DEVICE.type != "cuda" and not INTERPRET:
        return "interpreter shape: run with TRITON_INTERPRET=1"
    if provider in ("liger", "cce") and DEVICE.type != "cuda":
        return f"{provider} is a CUDA-only peer"
    if provider == "gemm3" and DEVICE.type != "cuda":
        return "gemm3 speed-of-light baseline is reported on CUDA"
    if provider == "eager" and DEVICE.type == "cuda":
        need = 5 * shape.n * shape.v * 4  # ~5 fp32 (N, V) tensors alive in eager fwd+bwd
        if need > 0.8 * torch.cuda.get_device_properties(0).total_memory:
            return f"eager would need ~{need / 2**30:.0f} GiB of (N, V) logits"
    return None


def _cases():
    shapes = shapes_for(DEVICE, quick=False) + (INTERPRETER_SHAPES if DEVICE.type != "cuda" else ())
    return [pytest.param(s, p, id=f"{s.name}-{p}") for s in shapes for p in PROVIDERS]


@pytest.mark.bench
@pytest.mark.parametrize("shape,provider", _cases())
def test_bench_sparse_kd(benchmark, request, shape: KDShape, provider: str):
    quick = _quick(request.config)
    if shape not in shapes_for(DEVICE, quick) and shape not in INTERPRETER_SHAPES:
        pytest.skip("not in the --quick shape set")
    reason = _skip_reason(shape, provider)
    if reason:
        pytest.skip(reason)
    torch.set_num_threads(2) if DEVICE.type == "cpu" else None
    x = make_kd_inputs(shape, DEVICE)
    if provider in ("eager", "chunked", "triton"):
        fn = _kd_fn(x, provider)
    elif provider == "gemm3":
        fn = _gemm3_fn(x)
    else:
        fn = _peer_fn(x, provider)
    t0 = time.perf_counter()
    fn()  # warm-up: Triton compile / autotune happen here and are reported separately
    first_s = time.perf_counter() - t0
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    big = shape.n * shape.v >= 2048 * 100_000
    rounds = 1 if (DEVICE.type == "cpu" and (quick or big)) else (3 if quick else 10)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    secs = benchmark.stats.stats.min
    info = {"shape": shape.name, "provider": provider, "n": shape.n, "h": shape.h, "v": shape.v, "k": shape.k}
    info.update(dtype=shape.dtype, device=device_name(), first_call_s=round(first_s, 4), **versions())
    info["tokens_per_s"] = round(shape.n / secs, 1)
    info["tflops_4nhv"] = round(shape.flops(2) / secs / 1e12, 4)
    if DEVICE.type == "cuda":
        info["peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        peak = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in device_name()), None)
        info["fraction_of_peak"] = round(info["tflops_4nhv"] / peak, 4) if peak else None
    elif provider in ("eager", "chunked"):
        info["peak_extra_mb"] = round(peak_extra_mb(shape.name, provider), 1)
    benchmark.extra_info.update(info)
