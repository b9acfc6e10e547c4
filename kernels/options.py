"""Options (one frozen dataclass per op) and input validation shared by every implementation.

Everything here runs before any kernel launch: a bad input raises ValueError naming what was expected.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from .choices import IMPLS, REDUCTIONS, loss_choice_problems


@dataclass(frozen=True)
class KDOptions:
    """How `sparse_kd_loss` reduces and scales (SPEC sections 2-3); travels into the autograd Function."""

    temperature: float = 1.0
    variant: str = "tail"  # "tail" | "renorm"
    reduction: str = "mean"  # "mean" | "sum" | "none"
    chunk_size: int = 4096  # upper bound on vocabulary columns per streamed chunk (streamed.blocking)
    divergence: str = "forward_kl"  # "forward_kl" | "reverse_kl" | "jsd" (SPEC section 2b)
    beta: float = 0.5  # jsd only: m = beta q + (1 - beta) p, strictly inside (0, 1)
    row_block: int | None = None  # rows per streamed block; None: per device (streamed.blocking)

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite float > 0, got {t!r}")
        for option, problem in loss_choice_problems(self.variant, self.divergence, self.beta):
            raise ValueError(f"{option} {problem}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.row_block is not None and self.row_block < 1:
            raise ValueError(f"row_block must be None or >= 1, got {self.row_block}")


@dataclass(frozen=True)
class TopkOptions:
    """What `topk_logprobs` returns: the k largest T=1 log-probs and c_T for each temperature."""

    k: int
    temperatures: tuple[float, ...] = (1.0,)
    chunk_size: int = 8192  # upper bound on vocabulary columns per streamed chunk (streamed.blocking)
    row_block: int | None = None  # rows per streamed block; None: per device (streamed.blocking)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        if self.row_block is not None and (not isinstance(self.row_block, int) or self.row_block < 1):
            raise ValueError(f"row_block must be None or an int >= 1, got {self.row_block!r}")
        if len(self.temperatures) == 0:
            raise ValueError("temperatures must name at least one temperature")
        for t in self.temperatures:
            if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"every temperature must be a finite float > 0, got {t!r}")


# impl="auto" off CUDA: eager (full logits) is faster than chunked for small heads. Measured by bench/kd_auto.py
# (bench/results/kd_auto.json, 2-core AMD EPYC, fwd+bwd, H=256, min of 3 alternating calls, on a loaded machine):
# at V=795 (the toy) eager won at every N (1.6-7.7x); below N x V = 2^22 eager won or tied (N=64 at V=49,152:
# 1.44x; N=256 at V=4,096: 1.28x); from N x V = 2^22 on chunked won (N=256 at V=16,384: 0.85x; N=1,024 at
# V=4,096: 0.64x; N=1,024 at V=49,152: 0.41x). The eager logits then stay under 16 MB (fp32).
AUTO_EAGER_VOCAB = 1024
AUTO_EAGER_NV = 1 << 22


def head_shape(hidden: torch.Tensor, weight: object) -> tuple[int | None, int | None]:
    """(N, V) of a loss call for ``check_impl``'s "auto" rule (None where the inputs are not 2-D tensors yet)."""
    ok = isinstance(weight, torch.Tensor) and hidden.dim() == 2 and weight.dim() == 2
    return (hidden.shape[0], weight.shape[0]) if ok else (None, None)


def check_impl(
    impl: str, device: torch.device, dtype: torch.dtype | None = None, n: int | None = None, v: int | None = None
) -> str:
    """Resolve ``impl``: "auto" is triton on CUDA; elsewhere (and for float64, e.g. gradcheck) eager when the head
    is small (V <= AUTO_EAGER_VOCAB or N x V < AUTO_EAGER_NV, when ``n`` and ``v`` are given), else chunked."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and dtype != torch.float64:
            return "triton"
        small = v is not None and n is not None and (v <= AUTO_EAGER_VOCAB or n * v < AUTO_EAGER_NV)
        return "eager" if small else "chunked"
    return impl


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_finite(name: str, x: torch.Tensor, block: int = 1 << 20) -> None:
    """NaN/inf scan in blocks of ``block`` elements: no temporary the size of ``x`` (e.g. a 600 MB head)."""
    flat = x.reshape(-1)
    for i in range(0, flat.numel(), block):
        if not bool(torch.isfinite(flat[i : i + block]).all()):
            raise ValueError(f"{name} contains NaN or inf")


def check_head(hidden: torch.Tensor, weight: torch.Tensor, *, finite: bool) -> None:
    """hidden (N, H) and weight (V, H): float, same device, matching H."""
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() != 2 or weight.dim() != 2:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"expected hidden (N, H) and weight (V, H), got {shapes}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H={hidden.shape[1]}) and weight (V, H={weight.shape[1]}) disagree on H")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row")
    if finite:
        check_finite("hidden", hidden)
        if not _known_finite(weight):  # a frozen head is scanned once, not at every step
            check_finite("weight", weight)
            _FINITE_HEAD[:] = [weakref.ref(weight.untyped_storage()), _layout(weight)]


_FINITE_HEAD: list = [lambda: None, None]  # the storage (weakly) and layout + version of the last head found finite


def _layout(w: torch.Tensor) -> tuple | None:
    """Offset, shape, strides, dtype and version counter (bumped by every in-place write through any view); None
    for an inference tensor, which has no version counter (never cached)."""
    try:
        return (w.storage_offset(), tuple(w.shape), w.stride(), w.dtype, w._version)
    except RuntimeError:
        return None


def _known_finite(w: torch.Tensor) -> bool:
    """``w`` is the last head found finite, unwritten since: the same live storage (a weak reference, so a freed
    head's address reused by another is never mistaken for it), layout and version."""
    ref, layout = _FINITE_HEAD
    return layout is not None and ref() is w.untyped_storage() and _layout(w) == layout


def check_kd_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    lse_t: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    finite: bool,
) -> None:
    """Validate `sparse_kd_loss` inputs (SPEC section 4). ``finite`` also scans for NaN/inf (eager/chunked)."""
    check_head(hidden, weight, finite=finite)
    n, v = hidden.shape[0], weight.shape[0]
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be an int32/int64 tensor, got {getattr(topk_ids, 'dtype', type(topk_ids))}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n:
        raise ValueError(f"topk_ids must be (N={n}, k), got {tuple(topk_ids.shape)}")
    _check_float("topk_logprobs", topk_logprobs)
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_logprobs must match topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_logprobs.shape)}")
    k = topk_ids.shape[1]
    if k < 1 or k > v:
        raise ValueError(f"k must be in [1, V={v}], got {k}")
    tensors = {"topk_ids": topk_ids, "topk_logprobs": topk_logprobs}
    if lse_t is not None:
        _check_float("lse_t", lse_t)
        if lse_t.shape != (n,):
            raise ValueError(f"lse_t must be (N={n},), got {tuple(lse_t.shape)}")
        tensors["lse_t"] = lse_t
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != (n,):
            raise ValueError(f"mask must be a (N={n},) tensor, got {getattr(mask, 'shape', type(mask))}")
        tensors["mask"] = mask
    for name, x in tensors.items():
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if n and k:
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < -1 or hi >= v:
            raise ValueError(f"topk_ids must lie in [0, V={v}) or be -1 (padding); found range [{lo}, {hi}]")
        valid = topk_ids >= 0
        if finite:
            check_finite("topk_logprobs (at valid ids)", topk_logprobs[valid])
            if bool((topk_logprobs[valid] > 1e-3).any()):
                raise ValueError("topk_logprobs must be log-probabilities (<= 0) at valid ids")
            if lse_t is not None:
                check_finite("lse_t", lse_t)
        # duplicate valid ids would double-count a token: sort each row and compare neighbours (O(N k log k))
        s = torch.sort(topk_ids.long(), dim=1).values
        if k > 1 and bool(((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any()):
            raise ValueError("topk_ids holds a duplicate valid id in some row (only -1 padding may repeat)")
