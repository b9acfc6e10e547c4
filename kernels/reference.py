"""Eager reference: docs/SPEC.md sections 1-4 written out on full logits (tests and benchmarks only).

This file is the spec in code (its row math is ``rowmath``'s, shared with every path). It materialises the
(N, V) logits, so it is only for small shapes, for tests (run in float64 it is the ground-truth oracle) and as
the benchmark baseline. Gradients come from plain autograd, so they check the hand-derived gradients of the
chunked and Triton paths independently.
"""

from __future__ import annotations

import torch

from .options import KDOptions, TopkOptions
from .rowmath import derive_lse_t, math_dtype, offk_mask, reduce_rows, row_losses_from_logp, student_logp_k


def sparse_kd_eager(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    lse_t: torch.Tensor | None,
    mask: torch.Tensor | None,
    opts: KDOptions,
) -> torch.Tensor:
    """Sparse top-k KD on full logits. Differentiable by autograd wrt hidden and weight.

    Shape:
        hidden (N, H), weight (V, H), topk_ids (N, k), topk_logprobs (N, k), lse_t (N,), mask (N,)
        -> () for mean/sum, (N,) for none
    """
    dt = math_dtype(hidden, weight)
    T = opts.temperature
    z = (hidden.to(dt) @ weight.to(dt).t()) / T  # (N, V) student logits at T
    valid = topk_ids >= 0
    if mask is not None:
        valid = valid & mask.bool()[:, None]
    v = weight.shape[0]
    log_off = torch.logsumexp(z.masked_fill(offk_mask(topk_ids, valid, v), float("-inf")), -1)  # (N,) direct
    lp_k, log_pt = student_logp_k(z.gather(1, topk_ids.long().clamp(min=0)), log_off, valid)  # fp64
    c = derive_lse_t(topk_ids, topk_logprobs, T, v) if lse_t is None else lse_t
    logq = topk_logprobs.double() / T - c.double()[:, None]  # (N, k) log q_j = l_j / T - c_T, teacher math in fp64
    loss = row_losses_from_logp(lp_k, logq, valid, opts.variant, v, log_pt, opts.divergence, opts.beta)
    return reduce_rows(loss, valid.any(-1), opts)


def topk_logprobs_eager(
    hidden: torch.Tensor, weight: torch.Tensor, opts: TopkOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k full-vocabulary log-probs at T=1 and c_T = LSE_v(l_v / T) per temperature, on full logits.

    Shape:
        hidden (N, H), weight (V, H) -> ids (N, k) int64, logprobs (N, k) fp32, lse_t (N, len(temperatures)) fp32
    """
    dt = math_dtype(hidden, weight)
    with torch.no_grad():
        logp = torch.log_softmax(hidden.to(dt) @ weight.to(dt).t(), -1)  # (N, V) at T = 1
        vals, ids = logp.topk(opts.k, -1)  # sorted descending
        lse = torch.stack([torch.logsumexp(logp / t, -1) for t in opts.temperatures], -1)
    out_dt = torch.float64 if dt == torch.float64 else torch.float32
    return ids, vals.to(out_dt), lse.to(out_dt)
