"""KD loss providers on one shared input dict (bench/shapes.py): ours, the peers users would pick instead, and the
bare-GEMM floor. Used by bench/test_bench_kd.py and bench/peers.py (CPU side by side); bench/gpu.sh's stages
do not import it (they keep to ssb_kernels' public API: bench/gpu_timings.py has its own floor and peers).

Every provider runs one forward + backward (gradient to ``hidden``; the head is frozen) on the same student
hidden states and head; the peers that take a sparse teacher get the same top-k teacher, converted to what
they expect (``SEMANTICS`` says how each one differs from ours). Peers are imported from ``.peers/`` (installed
by ``make bench-peers``, never into the venv) or wherever Python finds them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import ssb_kernels
import torch
from hardware import device_name, versions
from shapes import INTERPRETER_SHAPES, KDShape

PEERS_DIR = Path(os.environ.get("SSB_PEERS_DIR") or Path(__file__).resolve().parents[1] / ".peers")
OURS = ("eager", "chunked", "triton")
HIDDEN = ("hidden-eager", "hidden-chunked", "hidden-triton")  # hidden_kd_loss: the exact teacher from its hidden states
PEERS = ("axolotl", "liger-jsd", "trl", "cce", "torch-lce")
PROVIDERS = (*OURS, *HIDDEN, *PEERS, "floor")
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}  # dense bf16 tensor-core peaks, SXM datasheets
FLOOR_CHUNKS = (1024, 2048, 4096, 8192)

SEMANTICS = {
    "eager": "ours, reference: full (N, V) logits in memory",
    "chunked": "ours: forward KL on K + one tail outcome, exact c_T, streamed over vocabulary chunks, no dW",
    "triton": "ours on CUDA: the chunked math in Triton",
    "hidden-eager": "ours, hidden_kd_loss reference: exact full-vocabulary forward KL against the teacher's hidden "
    "states (same head), both (N, V) logits in memory",
    "hidden-chunked": "ours, hidden_kd_loss: exact full-vocabulary forward KL against the teacher's hidden states "
    "through the shared head, streamed (8NHV: one stacked logit GEMM and one stacked accumulator GEMM per chunk)",
    "hidden-triton": "ours on CUDA: hidden-chunked with the Triton row kernel",
    "axolotl": "Axolotl 0.19 top-k KD (LigerFusedLinearKLTopKLogprobLoss, compiled=False, chunks of 1024 rows, "
    "beta=0 forward KL): no tail term, teacher renormalised over K at T, student over the full vocabulary; "
    "the gradient is formed in forward and dW (V x H) is always accumulated",
    "liger-jsd": "Liger 0.8.5 chunked JSD (LigerFusedLinearJSDLoss, beta=0 forward KL, compiled=False): a DENSE "
    "teacher from its hidden states and head (online distillation, 2 heads' GEMMs per chunk), no T^2, dW too",
    "trl": "TRL 1.16 top-k + tail bucket (async_distillation _chunked_jsd_loss, beta=0, private API): chunks of "
    "256 rows x V, checkpointed (logits recomputed in backward), student tail as 1 - sum_K p, no T^2",
    "cce": "Apple Cut Cross-Entropy 25.1.1 (impl=torch_compile off CUDA): HARD labels only (the teacher's top-1); "
    "materialises N x V on CPU; compile time is its first_call_s",
    "torch-lce": "torch.nn.functional.linear_cross_entropy (torch 2.13): HARD labels only (the teacher's top-1)",
    "floor": "bare GEMMs of chunked's 4NHV FLOPs: s = h W_c^T then acc += s W_c per vocabulary chunk, best chunk "
    f"of {FLOOR_CHUNKS}",
}
_MODULES = {"axolotl": "axolotl", "liger-jsd": "liger_kernel", "trl": "trl", "cce": "cut_cross_entropy"}


def use_peers_dir() -> None:
    """Make ``.peers/`` importable (after the venv, so torch and friends still come from the venv)."""
    if PEERS_DIR.is_dir() and str(PEERS_DIR) not in sys.path:
        sys.path.append(str(PEERS_DIR))


def est_bytes(provider: str, n: int, h: int, v: int) -> float:
    """Rough peak extra bytes of one fwd+bwd, from the (rows, V) fp32 buffers each provider keeps alive
    (calibrated on N=2048, V=151,936, T=2: eager 6.2 GiB, Axolotl/Liger 3.0 GB); used to skip runs that cannot fit."""
    if provider == "hidden-eager":  # ~10 fp32 (N, V) tensors alive: two logits, log-softmaxes, probs, grads
        return 10.0 * n * v * 4
    rows = {"eager": n, "cce": n, "torch-lce": n, "axolotl": min(n, 2047), "liger-jsd": min(n, 2047),
            "trl": min(n, 256)}.get(provider, 0)  # fmt: skip
    return (5.0 if provider == "eager" else 3.0) * rows * v * 4 + (
        2 * v * h * 4 if provider in ("axolotl", "liger-jsd") else 0
    )


def skip_reason(shape: KDShape, provider: str, dev: torch.device) -> str | None:
    """Why ``provider`` is not run on ``shape`` here (None: run it)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    cuda = dev.type == "cuda"
    if provider in ("triton", "hidden-triton"):
        if not cuda and not interpret:
            return "triton needs CUDA (or TRITON_INTERPRET=1 on CPU for the tiny interpreter shape)"
        if not cuda and shape not in INTERPRETER_SHAPES:
            return "the Triton interpreter is only timed on the tiny interpreter shape"
    elif shape in INTERPRETER_SHAPES and not cuda and not interpret:
        return "interpreter shape: run with TRITON_INTERPRET=1"
    if provider in _MODULES:
        use_peers_dir()
        if importlib.util.find_spec(_MODULES[provider]) is None:
            return f"{_MODULES[provider]} is not installed (make bench-peers installs it into .peers/)"
    if provider == "torch-lce" and not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy (>= 2.13)"
    # ~5 fp32 (N, V) tensors alive in eager fwd+bwd; ~10 in hidden-eager (the teacher's and the student's)
    tensors = {"eager": 5, "hidden-eager": 10}.get(provider)
    if tensors is not None:
        need = tensors * shape.n * shape.v * 4
        have = torch.cuda.get_device_properties(0).total_memory if cuda else _host_memory()
        if need > (0.8 if cuda else 0.4) * have:
            return f"{provider} would need ~{need / 2**30:.0f} GiB of (N, V) logits ({have / 2**30:.0f} GiB here)"
    return None


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _axolotl_loss_cls():
    """Axolotl's loss without running ``axolotl/__init__`` (transformers, peft, pydantic...): empty parent packages."""
    use_peers_dir()
    if "axolotl" not in sys.modules:
        root = Path(importlib.util.find_spec("axolotl").submodule_search_locations[0]).parent
        for name in ("axolotl", "axolotl.integrations", "axolotl.integrations.kd"):
            mod = types.ModuleType(name)
            mod.__path__ = [str(root / name.replace(".", "/"))]
            sys.modules[name] = mod
    from axolotl.integrations.kd.kernels.liger import LigerFusedLinearKLTopKLogprobLoss

    return LigerFusedLinearKLTopKLogprobLoss


def make_fn(x: dict, provider: str, chunk: int | None = None) -> Callable[[], None]:
    """One forward+backward (grad to hidden) of ``provider`` on inputs ``x``, synchronised. ``chunk``: vocabulary
    columns per chunk for ``chunked`` (KDOptions.chunk_size, default 4096) and ``floor`` (default 4096)."""
    dev = x["hidden"].device
    hid, w, ids, lp, T = x["hidden"], x["weight"], x["topk_ids"], x["topk_logprobs"], x["temperature"]
    n, k = ids.shape
    logq = lp / T - x["lse_t"][:, None]  # (N, k) teacher log-probs at T (ours: unnormalised over K, tail kept)
    if provider == "floor":
        h, c = hid.detach(), chunk or 4096
        acc = torch.zeros_like(h)

        def floor():
            for v0 in range(0, w.shape[0], c):
                wc = w[v0 : v0 + c]
                acc.addmm_(h @ wc.t(), wc)  # the two GEMMs per chunk chunked does: (N, C) logits, then (N, H)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        return floor
    if provider in HIDDEN:
        g = torch.Generator(device="cpu").manual_seed(1)
        h_t = torch.randn(hid.shape, generator=g).to(dev, hid.dtype)  # the teacher's hidden states (as liger-jsd's)

        def call():
            return ssb_kernels.hidden_kd_loss(hid, w, h_t, temperature=T, mask=x["mask"], impl=provider[7:])
    elif provider in OURS and chunk is not None:
        from ssb_kernels.options import KDOptions
        from ssb_kernels.streamed_kd import sparse_kd_chunked

        opts = KDOptions(temperature=T, chunk_size=chunk)

        def call():
            return sparse_kd_chunked(hid, w, ids, lp, x["lse_t"], x["mask"], opts)
    elif provider in OURS:

        def call():
            return ssb_kernels.sparse_kd_loss(hid, w, ids, lp, lse_t=x["lse_t"], mask=x["mask"], temperature=T,
                                              impl=provider)  # fmt: skip
    elif provider == "axolotl":
        loss_mod = _axolotl_loss_cls()(weight_hard_loss=0.0, weight_soft_loss=1.0, temperature=T, beta=0.0,
                                       compiled=False, chunk_size=1024, compute_ce_loss=False,
                                       normalize_topk=False)  # fmt: skip
        q_k = torch.log_softmax(logq, -1)  # Axolotl's teacher: at T, renormalised over K
        args = (ids[None], q_k[None], torch.ones(1, n, k, dtype=torch.bool, device=dev),
                torch.zeros(1, n, dtype=torch.long, device=dev))  # fmt: skip

        def call():
            return loss_mod(w, hid[None], *args) / n  # it returns T^2 x the sum over rows
    elif provider == "liger-jsd":
        use_peers_dir()
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=T,
                                           compiled=False, chunk_size=1024)  # fmt: skip
        g = torch.Generator(device="cpu").manual_seed(1)
        h_t = torch.randn(hid.shape, generator=g).to(dev, hid.dtype)  # the teacher's hidden states, same width
        labels = torch.zeros(n, dtype=torch.long, device=dev)

        def call():
            return loss_mod(hid, w, h_t, w, labels)
    elif provider == "trl":
        use_peers_dir()
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.async_distillation.async_distillation_trainer import _chunked_jsd_loss

        valid = torch.ones(n, k, dtype=torch.bool, device=dev)

        def call():
            out = _chunked_jsd_loss(hid, w, None, 1.0, None, ids, logq, valid, 0.0, T, True, None, 1, 256)
            return out[0] / n  # a sum over rows
    else:
        target = ids[:, 0].long()  # hard-label peers: the teacher's top-1 as the label
        if provider == "cce":
            use_peers_dir()
            from cut_cross_entropy import linear_cross_entropy

            def call():
                return linear_cross_entropy(hid, w, target, impl="torch_compile" if dev.type != "cuda" else "cce")
        else:

            def call():
                return torch.nn.functional.linear_cross_entropy(hid, w, target)

    def fn():
        hid.grad = None
        call().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return fn


def figures(shape: KDShape, provider: str, secs: float, first_s: float, peak_mib: float | None) -> dict:
    """extra_info for one timed provider: tokens/s, TFLOP/s at 4NHV useful FLOPs, fraction of peak, memory."""
    dev = device_name()
    info = {"shape": shape.name, "provider": provider, "n": shape.n, "h": shape.h, "v": shape.v, "k": shape.k}
    info.update(dtype=shape.dtype, device=dev, first_call_s=round(first_s, 4), **versions())
    info["tokens_per_s"] = round(shape.n / secs, 1)
    info["tflops_4nhv"] = round(shape.flops(2) / secs / 1e12, 4)
    peak = next((v for key, v in PEAK_BF16_TFLOPS.items() if key in dev.lower()), None)
    if peak:
        info["fraction_of_peak"] = round(info["tflops_4nhv"] / peak, 4)
    if peak_mib is not None:
        info["peak_extra_mib"] = round(peak_mib, 1)
    return info
