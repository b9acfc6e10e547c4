"""The one shape registry for kernel benchmarks, and the setup factory every provider shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KDShape:
    """One sparse-KD benchmark problem: N distilled rows, hidden H, vocabulary V, top-k k."""

    name: str
    n: int
    h: int
    v: int
    k: int
    dtype: str = "float32"
    temperature: float = 1.0

    def flops(self, passes: int) -> float:
        """2 N H V FLOPs per logits-sized GEMM pass (forward logits, grad input, recompute...)."""
        return 2.0 * self.n * self.h * self.v * passes


QWEN_V, QWEN_H = 151936, 2048  # Qwen2.5-3B: vocabulary and hidden size (tied LM head)

CPU_SHAPES = (
    KDShape("cpu-small", n=256, h=256, v=32768, k=64),
    KDShape("cpu-target", n=2048, h=256, v=QWEN_V, k=64),  # the CPU target (eager 4.9 s, +4.6 GB)
)
INTERPRETER_SHAPES = (KDShape("interp-tiny", n=32, h=32, v=1024, k=8),)  # Triton under TRITON_INTERPRET=1
GPU_SHAPES = tuple(
    KDShape(f"qwen2.5-3b-n{n // 1024}k", n=n, h=QWEN_H, v=QWEN_V, k=64, dtype="bfloat16")
    for n in (1024, 4096, 8192, 16384)
)
ALL = {s.name: s for s in CPU_SHAPES + INTERPRETER_SHAPES + GPU_SHAPES}

# bench/peers.py: the issue-16 side by side (N=2048, H=256, V=151,936, k=64, T=2) and its scaling grid
PEER_K, PEER_T = 64, 2.0
SCALE_N = (512, 1024, 2048, 4096, 8192)  # 16,384 in the GPU suite
SCALE_V = (32000, QWEN_V, 262144)
SCALE_H = (256, 1024)


def peer_shape(n: int, h: int = 256, v: int = QWEN_V, k: int = PEER_K, t: float = PEER_T) -> KDShape:
    """A side-by-side / scaling shape, named by its sizes (``n2048-h256-v151936``)."""
    return KDShape(f"n{n}-h{h}-v{v}", n=n, h=h, v=v, k=k, temperature=t)


def shapes_for(device: torch.device, quick: bool) -> tuple[KDShape, ...]:
    """GPU: the Qwen2.5-3B set (quick: N = 1k, 8k). CPU: the CPU set (quick: both, the target run once)."""
    if device.type == "cuda":
        return tuple(s for s in GPU_SHAPES if not quick or s.n in (1024, 8192))
    return CPU_SHAPES


def make_kd_inputs(shape: KDShape, device: torch.device | str, seed: int = 0) -> dict:
    """Random student hidden/head and a sparse teacher with distinct ids per row (the shared setup factory).

    The head is scaled like a trained LM head (logit std ~ 2), the teacher is a softmax over k random logits
    placed below a random tail mass so c_T and the tail are non-trivial.

    Shape:
        hidden (N, H) requires grad, weight (V, H) frozen, topk_ids (N, k) int64, topk_logprobs (N, k) fp32,
        lse_t (N,) fp32 (exact c_T of this synthetic teacher), mask (N,) bool
    """
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, shape.dtype)
    n, h, v, k = shape.n, shape.h, shape.v, shape.k
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    start = torch.randint(0, v, (n, 1), generator=g)
    ids = (start + torch.arange(k) * max(1, v // k)) % v  # distinct per row
    tail = torch.rand(n, 1, generator=g) * 0.2  # teacher tail mass in [0, 0.2)
    top = torch.log_softmax(torch.randn(n, k, generator=g) * 2, -1) + torch.log1p(-tail)
    # exact c_T if the tail is spread evenly over the V - k other tokens
    lt = torch.log(tail.clamp(min=1e-30) / (v - k))
    t = shape.temperature
    lse_t = torch.logsumexp(torch.cat([top / t, (lt / t + torch.log(torch.tensor(float(v - k))))], -1), -1)
    return {
        "hidden": hidden.to(device=device, dtype=dt).requires_grad_(True),
        "weight": weight.to(device=device, dtype=dt),
        "topk_ids": ids.to(device),
        "topk_logprobs": top.to(device),
        "lse_t": lse_t.to(device),
        "mask": torch.ones(n, dtype=torch.bool, device=device),
        "temperature": t,
    }
