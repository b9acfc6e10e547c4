"""Chunked PyTorch teacher capture (the CPU default): streams over vocabulary chunks, never holds an (N, V)
tensor. The KD loss's chunked path is the torch row step of the streamed pass (``streamed_kd``)."""

from __future__ import annotations

import torch

from .options import TopkOptions
from .reference import math_dtype


@torch.no_grad()
def topk_logprobs_chunked(
    hidden: torch.Tensor, weight: torch.Tensor, opts: TopkOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streaming top-k over vocabulary chunks with an online LSE per temperature.

    lse_T(z) = LSE_v(z_v / T) is tracked against the running max m of z (max of z/T is m/T for T > 0);
    then l = z - lse_1 and c_T = LSE_v(l_v / T) = lse_T - lse_1 / T.

    Shape:
        hidden (N, H), weight (V, H) -> ids (N, k) int64, logprobs (N, k), lse_t (N, len(temperatures))
    """
    dt = math_dtype(hidden, weight)
    h = hidden.to(dt)
    n, k = h.shape[0], opts.k
    temps = sorted(set(opts.temperatures) | {1.0})  # each distinct T once; T = 1 always (normalisation)
    one = temps.index(1.0)
    m = h.new_full((n,), float("-inf"))
    sums = h.new_zeros(n, len(temps))
    best_v = h.new_empty(n, 0)
    best_i = torch.empty(n, 0, dtype=torch.long, device=h.device)
    for v0 in range(0, weight.shape[0], opts.chunk_size):
        z = h @ weight[v0 : v0 + opts.chunk_size].to(dt).t()  # (N, C)
        cv, ci = z.topk(min(k, z.shape[1]), 1)  # (N, <=k) chunk candidates, sorted
        m_new = torch.maximum(m, cv[:, 0])
        d = z.sub_(m_new[:, None])  # in place: z - m_new <= 0
        for j, t in enumerate(temps):
            e = d.exp() if t == 1.0 else (d / t).exp_()
            sums[:, j] = sums[:, j] * torch.exp((m - m_new) / t) + e.sum(1)
        cat_v, cat_i = torch.cat([best_v, cv], 1), torch.cat([best_i, ci + v0], 1)
        best_v, pos = cat_v.topk(min(k, cat_v.shape[1]), 1)  # sorted descending
        best_i = cat_i.gather(1, pos)
        m = m_new
    tt = torch.tensor(temps, dtype=dt, device=h.device)
    lse = m[:, None] / tt + torch.log(sums)  # (N, nT): LSE_v(z_v / T)
    c = lse - lse[:, one : one + 1] / tt  # c_T = lse_T - lse_1 / T
    cols = [temps.index(float(t)) for t in opts.temperatures]
    return best_i, best_v - lse[:, one : one + 1], c[:, cols]
