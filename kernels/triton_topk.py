"""Triton teacher capture (CUDA; CPU only under TRITON_INTERPRET=1): streaming top-k + c_T per temperature.

`_topk_logprobs_fwd_kernel` streams vocabulary tiles per (row block, vocabulary split). Per row it keeps on
chip the running max m of the raw logits z, for each temperature T the sum exp((z - m) / T), and a buffer
of the KP largest logits seen (each tile offers its k largest, in descending order, each replacing the
buffer minimum when larger: the buffer always holds the k largest logits seen so far). The host merges
the (N, splits) partials: lse_T = LSE_s(m_s / T + log l_s,T), l = z - lse_1, c_T = lse_T - lse_1 / T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import TopkOptions
from .triton_sparse_kd import BLOCK_H, _logit_tile, _prep, launch_config

BLOCK_N, BLOCK_V = 32, 128


@triton.jit
def _topk_logprobs_fwd_kernel(
    h_ptr,  # (N, H) hidden
    w_ptr,  # (V, H) LM head
    t_ptr,  # (NT,) fp32 temperatures
    m_ptr,  # (N, S) fp32 out: running max of z per split
    l_ptr,  # (N, S, TP) fp32 out: sum exp((z - m) / T) per split and temperature
    val_ptr,  # (N, S, KP) fp32 out: the KP largest z of the split
    id_ptr,  # (N, S, KP) int32 out: their vocabulary ids (-1 where empty)
    N, V, H, stride_h, stride_w, S, V_PER_SPLIT, NT,
    K: tl.constexpr, KP: tl.constexpr, TP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tcol = tl.arange(0, TP)
    inv_t = 1.0 / tl.load(t_ptr + tcol, mask=tcol < NT, other=1.0)  # (TP,)
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_N, TP), tl.float32)
    kcol = tl.arange(0, KP)
    vals = tl.full((BLOCK_N, KP), float("-inf"), tl.float32)
    ids = tl.full((BLOCK_N, KP), -1, tl.int32)
    vcol = tl.arange(0, BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + vcol
        col_ok = cols < v_end
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_H, PREC)  # fmt: skip
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        d = z - m_new[:, None]  # (BLOCK_N, BLOCK_V) <= 0
        for j in tl.static_range(TP):
            it = tl.sum(tl.where(tcol == j, inv_t, 0.0))  # 1 / T_j as a scalar
            add = tl.sum(tl.exp(d * it), 1)  # (BLOCK_N,)
            alpha = tl.exp((m - m_new) * it)
            l = tl.where(tcol[None, :] == j, l * alpha[:, None] + add[:, None], l)
        m = m_new
        for _ in range(K):  # offer this tile's K largest, in descending order
            t = tl.max(z, 1)
            targ = tl.argmax(z, 1)
            bmin = tl.min(vals, 1)
            bpos = tl.argmin(vals, 1)
            put = (kcol[None, :] == bpos[:, None]) & (t > bmin)[:, None]
            vals = tl.where(put, t[:, None], vals)
            ids = tl.where(put, (v0 + targ)[:, None].to(tl.int32), ids)
            z = tl.where(vcol[None, :] == targ[:, None], float("-inf"), z)
    r64 = rows.to(tl.int64)
    tl.store(m_ptr + r64 * S + pid_s, m, mask=row_ok)
    tl.store(l_ptr + (r64 * S + pid_s)[:, None] * TP + tcol[None, :], l, mask=row_ok[:, None])
    out = (r64 * S + pid_s)[:, None] * KP + kcol[None, :]
    tl.store(val_ptr + out, vals, mask=row_ok[:, None])
    tl.store(id_ptr + out, ids, mask=row_ok[:, None])


@torch.no_grad()
def topk_logprobs_triton(
    hidden: torch.Tensor, weight: torch.Tensor, opts: TopkOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``topk_logprobs``: ids (N, k) int64, logprobs (N, k) fp32, lse_t (N, nT) fp32."""
    h, w, prec = _prep(hidden, weight)
    n, hd = h.shape
    v, k = w.shape[0], opts.k
    temps = (1.0,) + tuple(opts.temperatures)  # column 0: T = 1 normalises everything
    if n == 0:
        empty = torch.zeros(0, k, dtype=torch.float32, device=h.device)
        return empty.long(), empty, torch.zeros(0, len(opts.temperatures), device=h.device)
    kp, tp = triton.next_power_of_2(max(k, 2)), triton.next_power_of_2(max(len(temps), 2))
    sm = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4
    n_tiles, v_tiles = triton.cdiv(n, BLOCK_N), triton.cdiv(v, BLOCK_V)
    splits = max(1, min(v_tiles, triton.cdiv(2 * sm, n_tiles)))
    per = triton.cdiv(v_tiles, splits) * BLOCK_V
    splits = triton.cdiv(v, per)
    dev = h.device
    tt = torch.tensor(temps, dtype=torch.float32, device=dev)
    m = torch.empty(n, splits, dtype=torch.float32, device=dev)
    l = torch.empty(n, splits, tp, dtype=torch.float32, device=dev)
    vals = torch.empty(n, splits, kp, dtype=torch.float32, device=dev)
    ids = torch.empty(n, splits, kp, dtype=torch.int32, device=dev)
    _topk_logprobs_fwd_kernel[(n_tiles, splits)](
        h, w, tt, m, l, vals, ids, n, v, hd, h.stride(0), w.stride(0), splits, per, len(temps),
        K=k, KP=kp, TP=tp, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, PREC=prec, **launch_config(h.device),
    )  # fmt: skip
    lse = torch.logsumexp(m[:, :, None] / tt + torch.log(l[:, :, : len(temps)]), 1)  # (N, 1 + nT)
    best, pos = vals.reshape(n, -1).topk(k, -1)  # sorted descending
    best_ids = ids.reshape(n, -1).gather(1, pos).long()
    c = lse[:, 1:] - lse[:, :1] / tt[1:]
    return best_ids, best - lse[:, :1], c
