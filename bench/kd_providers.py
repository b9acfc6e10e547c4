"""Sparse-KD benchmark providers on one shared input dict (bench/shapes.py), and their derived figures.

Used by bench/test_bench_kd.py (pytest-benchmark) and bench/kd_gpu.py (the no-pytest GPU runner).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import ssb_kernels
import torch
from hardware import device_name, versions
from shapes import INTERPRETER_SHAPES, KDShape

PROVIDERS = ("eager", "chunked", "triton", "liger", "cce", "gemm3")
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # dense bf16 tensor-core peaks, SXM datasheets


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def skip_reason(shape: KDShape, provider: str, dev: torch.device) -> str | None:
    """Why ``provider`` is not run on ``shape`` here (None: run it)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    cuda = dev.type == "cuda"
    if provider == "triton":
        if not cuda and not interpret:
            return "triton needs CUDA (or TRITON_INTERPRET=1 on CPU for the tiny interpreter shape)"
        if not cuda and shape not in INTERPRETER_SHAPES:
            return "the Triton interpreter is only timed on the tiny interpreter shape"
    elif shape in INTERPRETER_SHAPES and not cuda and not interpret:
        return "interpreter shape: run with TRITON_INTERPRET=1"
    if provider in ("liger", "cce"):
        if not cuda:
            return f"{provider} is a CUDA-only peer"
        mod = "liger_kernel.transformers" if provider == "liger" else "cut_cross_entropy"
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            return f"{mod.split('.')[0]} is not installed"
    if provider == "gemm3" and not cuda:
        return "the gemm3 speed-of-light baseline is reported on CUDA"
    if provider == "eager" and cuda:
        need = 5 * shape.n * shape.v * 4  # ~5 fp32 (N, V) tensors alive in eager fwd+bwd
        if need > 0.8 * torch.cuda.get_device_properties(0).total_memory:
            return f"eager would need ~{need / 2**30:.0f} GiB of (N, V) logits"
    return None


def make_fn(x: dict, provider: str) -> Callable[[], None]:
    """One forward+backward (grad to hidden) of ``provider`` on inputs ``x``, synchronised."""
    dev = x["hidden"].device
    if provider in ("eager", "chunked", "triton"):

        def fn():
            x["hidden"].grad = None
            loss = ssb_kernels.sparse_kd_loss(
                x["hidden"], x["weight"], x["topk_ids"], x["topk_logprobs"],
                lse_t=x["lse_t"], mask=x["mask"], impl=provider,
            )  # fmt: skip
            loss.backward()
            _sync(dev)

        return fn
    if provider == "gemm3":
        h, w = x["hidden"].detach(), x["weight"]

        def fn():
            z = h @ w.t()  # forward logits
            z = h @ w.t()  # backward recompute
            _ = z @ w  # grad input
            _sync(dev)

        return fn
    target = x["topk_ids"][:, 0].long()  # a fused linear cross-entropy peer: same GEMMs, a different loss
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_mod = LigerFusedLinearCrossEntropyLoss()

        def call():
            return loss_mod(x["weight"], x["hidden"], target)
    else:
        from cut_cross_entropy import linear_cross_entropy

        def call():
            return linear_cross_entropy(x["hidden"], x["weight"], target)

    def fn():
        x["hidden"].grad = None
        call().backward()
        _sync(dev)

    return fn


def figures(shape: KDShape, provider: str, secs: float, first_s: float, peak_mib: float | None) -> dict:
    """extra_info for one timed provider: tokens/s, TFLOP/s at 4NHV useful FLOPs, fraction of peak, memory."""
    info = {"shape": shape.name, "provider": provider, "n": shape.n, "h": shape.h, "v": shape.v, "k": shape.k}
    info.update(dtype=shape.dtype, device=device_name(), first_call_s=round(first_s, 4), **versions())
    info["tokens_per_s"] = round(shape.n / secs, 1)
    info["tflops_4nhv"] = round(shape.flops(2) / secs / 1e12, 4)
    peak = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in device_name()), None)
    if peak:
        info["fraction_of_peak"] = round(info["tflops_4nhv"] / peak, 4)
    if peak_mib is not None:
        info["peak_extra_mib"] = round(peak_mib, 1)
    return info
