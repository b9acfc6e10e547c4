"""Triton sparse KD (CUDA; CPU only under TRITON_INTERPRET=1), Cut-Cross-Entropy style.

Forward: `_sparse_kd_fwd_kernel` streams vocabulary tiles per row block and keeps only a running max and
sum per row (logit tiles live on chip, never in HBM); the grid also splits the vocabulary so small N still
fills the GPU, and the (N, splits) partials are merged on the host. The k student logits on K come from a
row-blocked gather (N k H work). Backward: `_sparse_kd_bwd_kernel` recomputes each (rows x vocab) logit
tile and applies the dense part of the SPEC gradient, atomically adding into fp32 dh (and dW when the head
requires grad); the sparse correction on K is a row-blocked gather on the host.

Gradient (SPEC section 2): dL/d(z/T) = a * p + b on K, with a (N,) and b (N, k) from `kd_coefficients`.
With w the per-row factor (upstream grad x reduction x T^2 x 1/T):
    dh = sum_v (w a p_v) W_v + sum_K (w b_j) W_j         dW_v = (w a p_v) h (+ (w b_j) h at v = K_j)
Tiles whose largest |w a p| is below FILTER_EPS may be skipped (off by default; SSB_KD_FILTER_EPS).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunked import dense_form, gathered_logits, kd_coefficients, sparse_matvec
from .options import KDOptions
from .reference import derive_lse_t, log1mexp, row_losses_from_logp

BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64  # fixed tuned config; autotuning is not enabled by default
FILTER_EPS = float(os.environ.get("SSB_KD_FILTER_EPS", "0"))


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """(BLOCK_N, BLOCK_V) fp32 logits h[rows] . W[cols]^T, looping over H in BLOCK_H slices."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < H
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + hk[None, :],
                    mask=row_ok[:, None] & hk_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_w + hk[:, None],
                    mask=col_ok[None, :] & hk_ok[:, None], other=0.0)  # fmt: skip
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _sparse_kd_fwd_kernel(
    h_ptr,  # (N, H) student hidden, row stride stride_h
    w_ptr,  # (V, H) LM head, row stride stride_w
    m_ptr,  # (N, S) fp32 out: running max of z / T per vocabulary split
    l_ptr,  # (N, S) fp32 out: sum exp(z / T - m) per split
    N, V, H, stride_h, stride_w, S, V_PER_SPLIT, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        s = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_H, IEEE) * inv_t  # fmt: skip
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    out = rows.to(tl.int64) * S + pid_s
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)


@triton.jit
def _sparse_kd_bwd_kernel(
    h_ptr,  # (N, H) student hidden
    w_ptr,  # (V, H) LM head
    lse_ptr,  # (N,) fp32 LSE of z / T
    coef_ptr,  # (N,) fp32 w * a: per-row factor of the dense gradient term
    dh_ptr,  # (N, H) fp32 out, accumulated atomically
    dw_ptr,  # (V, H) fp32 out (HAS_DW), accumulated atomically
    N, V, H, stride_h, stride_w, inv_t, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
    HAS_DW: tl.constexpr, FILTER: tl.constexpr,
):  # fmt: skip
    pid_n, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < N, cols < V
    s = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                    BLOCK_N, BLOCK_V, BLOCK_H, IEEE) * inv_t  # fmt: skip
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    g = coef[:, None] * tl.exp(s - lse[:, None])  # (BLOCK_N, BLOCK_V) = w a p
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    if FILTER:
        if tl.max(tl.abs(g)) < filter_eps:
            return
    gd = g.to(h_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < H
        wt = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_w + hk[None, :],
            mask=col_ok[:, None] & hk_ok[None, :],
            other=0.0,
        )  # fmt: skip  (BLOCK_V, BLOCK_H)
        if IEEE:
            dh = tl.dot(gd, wt, input_precision="ieee")
        else:
            dh = tl.dot(gd, wt)
        tl.atomic_add(dh_ptr + rows[:, None].to(tl.int64) * H + hk[None, :], dh,
                      mask=row_ok[:, None] & hk_ok[None, :])  # fmt: skip
        if HAS_DW:
            ht = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + hk[None, :],
                         mask=row_ok[:, None] & hk_ok[None, :], other=0.0)  # fmt: skip
            if IEEE:
                dw = tl.dot(tl.trans(gd), ht, input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(gd), ht)
            tl.atomic_add(dw_ptr + cols[:, None].to(tl.int64) * H + hk[None, :], dw,
                          mask=col_ok[:, None] & hk_ok[None, :])  # fmt: skip


def _prep(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Same-dtype contiguous operands for tl.dot; fp32 math uses IEEE dots (no TF32)."""
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    if dt == torch.float64:
        raise ValueError("impl='triton' takes fp32/fp16/bf16 inputs; use impl='chunked' for float64")
    return hidden.to(dt).contiguous(), weight.to(dt).contiguous(), dt == torch.float32


def triton_lse(h: torch.Tensor, w: torch.Tensor, temperature: float, ieee: bool) -> torch.Tensor:
    """LSE_v(h . W_v / T) per row without materialising logits. Shape: h (N, H), w (V, H) -> (N,) fp32."""
    n, hd = h.shape
    v = w.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=h.device)
    sm = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4
    n_tiles, v_tiles = triton.cdiv(n, BLOCK_N), triton.cdiv(v, BLOCK_V)
    splits = max(1, min(v_tiles, triton.cdiv(2 * sm, n_tiles)))  # fill the machine when N is small
    per = triton.cdiv(v_tiles, splits) * BLOCK_V
    splits = triton.cdiv(v, per)
    m = torch.empty(n, splits, dtype=torch.float32, device=h.device)
    l = torch.empty_like(m)
    _sparse_kd_fwd_kernel[(n_tiles, splits)](
        h, w, m, l, n, v, hd, h.stride(0), w.stride(0), splits, per, 1.0 / temperature,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, IEEE=ieee,
    )  # fmt: skip
    return torch.logsumexp(m + torch.log(l), -1)


class _SparseKDTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts: KDOptions):
        T = opts.temperature
        h, w, ieee = _prep(hidden, weight)
        lse = triton_lse(h, w, T, ieee)  # (N,)
        valid = topk_ids >= 0
        if mask is not None:
            valid = valid & mask.bool()[:, None]
        row_valid = valid.any(-1)
        idx = topk_ids.long().clamp(min=0)
        lp_k = gathered_logits(h.float() / T, w, idx) - lse[:, None]  # (N, k) student log p on K
        v = w.shape[0]
        c = derive_lse_t(topk_ids, topk_logprobs, T, v) if lse_t is None else lse_t.float()
        logq = topk_logprobs.float() / T - c[:, None]
        # not yet cancellation-free: this forward has no off-K sums, so p_t is 1 - P_K (see dense_form)
        log_pt = log1mexp(torch.logsumexp(lp_k.masked_fill(~valid, float("-inf")), -1).clamp(max=0.0))
        loss = row_losses_from_logp(lp_k, logq, valid, opts.variant, v, log_pt)
        loss = torch.where(row_valid, loss, torch.zeros_like(loss)) * T**2
        a, b = dense_form(*kd_coefficients(lp_k, logq, valid, opts.variant, v, log_pt), lp_k, log_pt, valid)
        a, b = torch.where(row_valid, a, torch.zeros_like(a)).float(), b.float()
        ctx.opts, ctx.n_valid, ctx.ieee = opts, int(row_valid.sum()), ieee
        ctx.in_dtypes = (hidden.dtype, weight.dtype)
        ctx.save_for_backward(h, w, idx, a, b, lse)
        if opts.reduction == "none":
            return loss
        return loss.sum() if opts.reduction == "sum" else loss.sum() / max(ctx.n_valid, 1)

    @staticmethod
    def backward(ctx, grad_out):
        h, w, idx, a, b, lse = ctx.saved_tensors
        opts: KDOptions = ctx.opts
        T = opts.temperature
        wrow = grad_out.float() * T / (max(ctx.n_valid, 1) if opts.reduction == "mean" else 1)
        wrow = wrow.expand(a.shape) if wrow.dim() == 0 else wrow  # (N,)
        coef, wb = (wrow * a).contiguous(), wrow[:, None] * b  # (N,), (N, k)
        need_dw = ctx.needs_input_grad[1]
        n, hd = h.shape
        v = w.shape[0]
        dh = torch.zeros(n, hd, dtype=torch.float32, device=h.device)
        dw = torch.zeros(v, hd, dtype=torch.float32, device=h.device) if need_dw else dh
        if n:  # an empty grid is not a valid launch
            grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(v, BLOCK_V))
            _sparse_kd_bwd_kernel[grid](
                h, w, lse, coef, dh, dw, n, v, hd, h.stride(0), w.stride(0), 1.0 / T, FILTER_EPS,
                BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, IEEE=ctx.ieee, HAS_DW=need_dw, FILTER=FILTER_EPS > 0,
            )  # fmt: skip
        dh += sparse_matvec(wb, w, idx)
        dh_out = dh.to(ctx.in_dtypes[0]) if ctx.needs_input_grad[0] else None
        dw_out = None
        if need_dw:
            dw.index_add_(0, idx.reshape(-1), (wb[:, :, None] * h.float()[:, None, :]).reshape(-1, hd))
            dw_out = dw.to(ctx.in_dtypes[1])
        return dh_out, dw_out, None, None, None, None, None


def sparse_kd_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    lse_t: torch.Tensor | None,
    mask: torch.Tensor | None,
    opts: KDOptions,
) -> torch.Tensor:
    """Triton sparse KD loss (see module docstring). Same contract as ``sparse_kd_loss``."""
    return _SparseKDTriton.apply(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts)
