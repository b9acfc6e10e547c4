"""Triton sparse KD (CUDA; CPU only under TRITON_INTERPRET=1), Cut-Cross-Entropy style.

Forward: `_sparse_kd_fwd_kernel` streams vocabulary tiles per row block and keeps, per row, a running max and
sum over the columns NOT in K (the student's off-K mass, summed directly: never 1 - P_K, docs/SPEC.md section
4). Logit tiles live on chip, never in HBM; the grid also splits the vocabulary so small N still fills the
GPU, and the (N, splits) partials are merged on the host. Which tile entries are K is a CSR list per (row
block, vocabulary tile) built on the host (`k_hits`, O(N k)); a tile with no K entry pays one empty loop.
The max runs over off-K columns only, so a lead of 120 needs no redo pass (the chunked path's OFFK_TINY).
The k student logits on K come from a row-blocked gather; log p on K, log p_t, the loss and the gradient
coefficients a, b are the float64 row math shared with the chunked path.

Gradient (SPEC section 2): dL/d(z/T) = a * (p_v / p_t) off K + b on K. With w the per-row factor (upstream
grad x reduction x T^2 x 1/T) and e_v = p_v / p_t = exp(z_v / T - log_off) off K (0 on K):
    dh = (w a) * sum_v e_v W_v + sum_K (w b_j) W_j        dW_v = sum_rows (w a) e_v h (+ (w b_j) h at v = K_j)
`_sparse_kd_bwd_kernel` recomputes each (rows x vocab) tile of e in fp32, in [0, 1], and for dh applies the
fp32 coefficient w a AFTER the dot (only e is cast to the input dtype). dW contracts over rows, so there the
coefficient goes in before the dot; for fp16 the tile is first scaled by a power of two so its largest entry
sits near 2^14 (no subnormal flush; undone exactly after the dot). The K part is a gather on the host in fp32,
and dh / dW are cast to the input dtype once, at the end. Tiles whose largest |w a e| is below FILTER_EPS may
be skipped (off by default; SSB_KD_FILTER_EPS).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunked import gathered_logits, kd_coefficients, sparse_matvec
from .options import KDOptions
from .reference import derive_lse_t, row_losses_from_logp, student_logp_k

BLOCK_N, BLOCK_V, BLOCK_H = 64, 128, 64  # fixed tuned config; autotuning is not enabled by default
GROUP_N = 8  # backward launch order: GROUP_N row blocks sweep each vocabulary tile together (see the kernel)
FILTER_EPS = float(os.environ.get("SSB_KD_FILTER_EPS", "0"))


def launch_config(device: torch.device) -> dict:
    """num_warps / num_stages per architecture (blind: no GPU was available when this was written).

    The tiles are (64 x 128) logits with 64-wide H slices. Hopper (sm_90, 228 KB shared memory) and Ampere
    datacenter parts (sm_80, 164 KB) hold 3 pipeline stages of the bf16 operand slices (64x64 + 128x64, 24 KB
    per stage) with room to spare, and 8 warps keep the 64x128 fp32 accumulator at 32 registers per thread.
    Consumer Ampere/Ada (sm_86/sm_89, ~100 KB) and Turing (sm_75, 64 KB) get 2 stages and 4 warps, which
    Triton's own matmul configs also use there. The interpreter ignores both.
    """
    if device.type != "cuda":
        return {}
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) in ((8, 0), (9, 0)) or major >= 10:
        return {"num_warps": 8, "num_stages": 3}
    return {"num_warps": 4, "num_stages": 2}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for fp32 operands, from torch.get_float32_matmul_precision() (torch's default
    "highest" is IEEE fp32; "high" is 3xTF32, "medium" TF32). Half operands: "default" (tl.dot's own)."""
    if dtype != torch.float32:
        return "default"
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}[torch.get_float32_matmul_precision()]


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in fp32; PREC is the fp32 input precision, or "default" for half operands."""
    if PREC == "default":
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """(BLOCK_N, BLOCK_V) fp32 logits h[rows] . W[cols]^T, looping over H in BLOCK_H slices."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < H
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + hk[None, :],
                    mask=row_ok[:, None] & hk_ok[None, :], other=0.0)  # fmt: skip
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_w + hk[:, None],
                    mask=col_ok[None, :] & hk_ok[:, None], other=0.0)  # fmt: skip
        acc = _dot(a, b, acc, PREC)
    return acc


@triton.jit
def _mask_k(s, off_ptr, hit_ptr, tile, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """s with this (row block, vocabulary tile)'s K entries set to -inf: loops over the tile's CSR hits only."""
    lo = tl.load(off_ptr + tile)
    hi = tl.load(off_ptr + tile + 1)
    loc = tl.arange(0, BLOCK_N)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    for i in range(lo, hi):
        s = tl.where(loc == tl.load(hit_ptr + i), float("-inf"), s)
    return s


@triton.jit
def _sparse_kd_fwd_kernel(
    h_ptr,  # (N, H) student hidden, row stride stride_h
    w_ptr,  # (V, H) LM head, row stride stride_w
    off_ptr,  # (n_tiles * v_tiles + 1,) int32: CSR offsets of each (row block, vocabulary tile)'s K hits
    hit_ptr,  # (n_hits,) int32: local row * BLOCK_V + local column of each valid K id, grouped by tile
    m_ptr,  # (N, S) fp32 out: running max of the off-K z / T per vocabulary split (-inf: none yet)
    l_ptr,  # (N, S) fp32 out: sum over off-K columns of exp(z / T - m) per split
    N, V, H, stride_h, stride_w, S, V_PER_SPLIT, V_TILES, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    v_start = pid_s * V_PER_SPLIT  # a multiple of BLOCK_V, so v0 // BLOCK_V is the CSR tile
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        s = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_H, PREC) * inv_t  # fmt: skip
        s = tl.where(col_ok[None, :], s, float("-inf"))
        s = _mask_k(s, off_ptr, hit_ptr, pid_n * V_TILES + v0 // BLOCK_V, BLOCK_N, BLOCK_V)
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every column so far was K: nothing to rescale
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    out = rows.to(tl.int64) * S + pid_s
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)


@triton.jit
def _sparse_kd_bwd_kernel(
    h_ptr,  # (N, H) student hidden
    w_ptr,  # (V, H) LM head
    off_ptr,  # (n_tiles * v_tiles + 1,) int32 CSR offsets of the K hits (as in the forward)
    hit_ptr,  # (n_hits,) int32 local flat positions of the K hits
    logoff_ptr,  # (N,) fp32 off-K LSE of z / T (0 where there is no off-K column: then every e is 0)
    coef_ptr,  # (N,) fp32 w * a: per-row factor of the dense gradient term
    dh_ptr,  # (N, H) fp32 out, accumulated atomically
    dw_ptr,  # (V, H) fp32 out (HAS_DW), accumulated atomically
    N, V, H, stride_h, stride_w, N_TILES, V_TILES, inv_t, filter_eps,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    PREC: tl.constexpr, HALF_RANGE: tl.constexpr, HAS_DW: tl.constexpr, FILTER: tl.constexpr,
):  # fmt: skip
    # Grouped launch order (Triton's matmul tutorial): consecutive programs take GROUP_N row blocks for one
    # vocabulary tile, then the next tile. The programs resident at once then share a few W tiles and GROUP_N
    # h blocks through L2 instead of each streaming its own, and the dh atomics of one row block are spread
    # over time (each row block meets a new vocabulary tile every GROUP_N programs). The dW rows of one tile
    # take GROUP_N concurrent adds: fp32 atomics in L2, cheap next to a 64 x 128 x H tile of dots.
    pid = tl.program_id(0)
    per_group = GROUP_N * V_TILES
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(N_TILES - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < N, cols < V
    s = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                    BLOCK_N, BLOCK_V, BLOCK_H, PREC) * inv_t  # fmt: skip
    s = tl.where(row_ok[:, None] & col_ok[None, :], s, float("-inf"))
    s = _mask_k(s, off_ptr, hit_ptr, pid_n * V_TILES + pid_v, BLOCK_N, BLOCK_V)
    log_off = tl.load(logoff_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    e = tl.exp(s - log_off[:, None])  # (BLOCK_N, BLOCK_V) fp32 = p_v / p_t off K, 0 on K and out of range
    if FILTER:
        if tl.max(tl.abs(coef[:, None] * e)) < filter_eps:
            return
    dt = h_ptr.dtype.element_ty
    # dh operand: e itself (the coefficient comes after the dot). dW operand: coef * e, which for fp16 is
    # scaled by a power of two so its largest entry is near 2^14 (an entry of 1e-8 would flush to 0 in fp16;
    # bf16 has fp32's exponent range and fp32 is not cast, so they keep scale 1).
    e_sc = 1.0
    if HALF_RANGE:
        e_sc = tl.exp2(14.0 - tl.ceil(tl.log2(tl.maximum(tl.max(e), 1e-30))))
    ed = (e * e_sc).to(dt)
    if HAS_DW:
        g = coef[:, None] * e
        g_sc = 1.0
        if HALF_RANGE:
            g_sc = tl.exp2(14.0 - tl.ceil(tl.log2(tl.maximum(tl.max(tl.abs(g)), 1e-30))))
        gt = tl.trans((g * g_sc).to(dt))
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < H
        wt = tl.load(
            w_ptr + cols[:, None].to(tl.int64) * stride_w + hk[None, :],
            mask=col_ok[:, None] & hk_ok[None, :],
            other=0.0,
        )  # fmt: skip  (BLOCK_V, BLOCK_H)
        # the fp32 coefficient (and the undoing of the fp16 scale) comes after the dot
        dh = _dot(ed, wt, tl.zeros((BLOCK_N, BLOCK_H), tl.float32), PREC) * (coef / e_sc)[:, None]
        # relaxed: nothing reads dh / dW before the kernel ends, so no ordering fence is needed per add
        tl.atomic_add(dh_ptr + rows[:, None].to(tl.int64) * H + hk[None, :], dh,
                      mask=row_ok[:, None] & hk_ok[None, :], sem="relaxed")  # fmt: skip
        if HAS_DW:
            ht = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + hk[None, :],
                         mask=row_ok[:, None] & hk_ok[None, :], other=0.0)  # fmt: skip
            dw = _dot(gt, ht, tl.zeros((BLOCK_V, BLOCK_H), tl.float32), PREC) * (1.0 / g_sc)
            tl.atomic_add(dw_ptr + cols[:, None].to(tl.int64) * H + hk[None, :], dw,
                          mask=col_ok[:, None] & hk_ok[None, :], sem="relaxed")  # fmt: skip


def check_triton_device(x: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors; CPU tensors only run under TRITON_INTERPRET=1 (tests)."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors, got tensors on {x.device}; use impl='chunked' on CPU "
            "(or set TRITON_INTERPRET=1 before triton is imported, for tests)"
        )


def _prep(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Same-dtype contiguous operands for tl.dot and the fp32 dot precision (``dot_precision``)."""
    check_triton_device(hidden)
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    if dt == torch.float64:
        raise ValueError("impl='triton' takes fp32/fp16/bf16 inputs; use impl='chunked' for float64")
    return hidden.to(dt).contiguous(), weight.to(dt).contiguous(), dot_precision(dt)


def k_hits(idx: torch.Tensor, valid: torch.Tensor, n_tiles: int, v_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the valid K entries per (row block, vocabulary tile), for the kernels' K masking.

    Shape:
        idx (N, k) long in [0, V), valid (N, k) -> offsets (n_tiles * v_tiles + 1,) int32, hits (n_valid,) int32
        (hits hold local row * BLOCK_V + local column, grouped by tile)
    """
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)[valid]
    cols = idx[valid]
    tile = (rows // BLOCK_N) * v_tiles + cols // BLOCK_V
    tile, order = torch.sort(tile)
    hits = ((rows % BLOCK_N) * BLOCK_V + cols % BLOCK_V)[order].int()
    bounds = torch.arange(n_tiles * v_tiles + 1, device=idx.device)
    return torch.searchsorted(tile, bounds).int(), hits


def triton_offk_lse(h, w, temperature, prec, offsets, hits) -> torch.Tensor:
    """LSE over the off-K columns of h . W_v / T per row (-inf if K is the vocabulary), no logits in HBM.

    Shape: h (N, H), w (V, H) -> (N,) fp64 (the split partials are merged in fp64)
    """
    n, hd = h.shape
    v = w.shape[0]
    sm = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 4
    n_tiles, v_tiles = triton.cdiv(n, BLOCK_N), triton.cdiv(v, BLOCK_V)
    splits = max(1, min(v_tiles, triton.cdiv(2 * sm, n_tiles)))  # fill the machine when N is small
    per = triton.cdiv(v_tiles, splits) * BLOCK_V
    splits = triton.cdiv(v, per)
    m = torch.empty(n, splits, dtype=torch.float32, device=h.device)
    l = torch.empty_like(m)
    _sparse_kd_fwd_kernel[(n_tiles, splits)](
        h, w, offsets, hits, m, l, n, v, hd, h.stride(0), w.stride(0), splits, per, v_tiles, 1.0 / temperature,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, PREC=prec, **launch_config(h.device),
    )  # fmt: skip
    return torch.logsumexp(m.double() + torch.log(l.double()), -1)  # -inf + log 0 = -inf for empty splits


class _SparseKDTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts: KDOptions):
        T = opts.temperature
        h, w, prec = _prep(hidden, weight)
        n, v = h.shape[0], w.shape[0]
        valid = topk_ids >= 0
        if mask is not None:
            valid = valid & mask.bool()[:, None]
        row_valid = valid.any(-1)
        idx = topk_ids.long().clamp(min=0)
        offsets, hits = k_hits(idx, valid, triton.cdiv(n, BLOCK_N), triton.cdiv(v, BLOCK_V))
        log_off = triton_offk_lse(h, w, T, prec, offsets, hits) if n else h.new_zeros(0, dtype=torch.float64)
        # (N, k) student log p on K and (N,) log p_t from the off-K sum: fp64, as in the chunked path
        lp_k, log_pt = student_logp_k(gathered_logits(h.float() / T, w, idx), log_off, valid)
        c = derive_lse_t(topk_ids, topk_logprobs, T, v) if lse_t is None else lse_t
        logq = topk_logprobs.double() / T - c.double()[:, None]
        loss = row_losses_from_logp(lp_k, logq, valid, opts.variant, v, log_pt, opts.divergence, opts.beta).float()
        loss = torch.where(row_valid, loss, torch.zeros_like(loss)) * T**2
        a, b = kd_coefficients(lp_k, logq, valid, opts.variant, v, log_pt, opts.divergence, opts.beta)  # fp64
        a = torch.where(row_valid, a, torch.zeros_like(a))
        ctx.opts, ctx.n_valid, ctx.prec = opts, int(row_valid.sum()), prec
        ctx.in_dtypes = (hidden.dtype, weight.dtype)
        log_off = torch.where(torch.isfinite(log_off), log_off, 0.0).float()  # no off-K column: e = exp(-inf) = 0
        ctx.save_for_backward(h, w, idx, offsets, hits, a, b, log_off)
        if opts.reduction == "none":
            return loss
        return loss.sum() if opts.reduction == "sum" else loss.sum() / max(ctx.n_valid, 1)

    @staticmethod
    def backward(ctx, grad_out):
        h, w, idx, offsets, hits, a, b, log_off = ctx.saved_tensors
        opts: KDOptions = ctx.opts
        T = opts.temperature
        # per-row factor (upstream grad x reduction x T^2 x 1/T) times a and b: formed in fp64, cast to fp32 once
        wrow = grad_out.double() * T / (max(ctx.n_valid, 1) if opts.reduction == "mean" else 1)
        wrow = wrow.expand(a.shape) if wrow.dim() == 0 else wrow  # (N,)
        coef, wb = (wrow * a).float().contiguous(), (wrow[:, None] * b).float()  # (N,), (N, k)
        need_dw = ctx.needs_input_grad[1]
        n, hd = h.shape
        v = w.shape[0]
        dh = torch.zeros(n, hd, dtype=torch.float32, device=h.device)
        dw = torch.zeros(v, hd, dtype=torch.float32, device=h.device) if need_dw else dh
        if n:  # an empty grid is not a valid launch
            n_tiles, v_tiles = triton.cdiv(n, BLOCK_N), triton.cdiv(v, BLOCK_V)
            _sparse_kd_bwd_kernel[(n_tiles * v_tiles,)](
                h, w, offsets, hits, log_off, coef, dh, dw, n, v, hd, h.stride(0), w.stride(0), n_tiles, v_tiles,
                1.0 / T, FILTER_EPS, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H, GROUP_N=GROUP_N,
                PREC=ctx.prec, HALF_RANGE=h.dtype == torch.float16, HAS_DW=need_dw, FILTER=FILTER_EPS > 0,
                **launch_config(h.device),
            )  # fmt: skip
        dh += sparse_matvec(wb, w, idx)  # the K part, fp32
        dh_out = dh.to(ctx.in_dtypes[0]) if ctx.needs_input_grad[0] else None  # the one cast
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
