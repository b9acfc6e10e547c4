"""Triton row kernels of the streamed KD pass (impl="triton"; CUDA, or CPU under TRITON_INTERPRET=1).

Everything between and after the vendor GEMMs of ``streamed.stream`` is row-local and lives here, in kernels
without ``tl.dot`` (the interpreter runs them faithfully in fp32, fp16 and bf16):

``_offset_rows_fwd_kernel``, one program per row of a (row block, vocabulary chunk) logit tile s (fp32):
    1. for each of the row's excluded ids in the chunk (CSR, O(hits)): capture s there, then set it to -inf;
    2. per logit scale c (1/T, and 1 for CE), one read of the row: E = exp(c s - m) written in the input dtype
       against the row's current reference m, l += sum E in fp32, and the chunk's max taken on the way;
    3. lazy reference max: m moves only when the chunk's max beats it by more than TAU (always for the row's
       first chunk with an off-set column). Then E and the sum are redone against the new m (a second read,
       rare after the first chunks) and the accumulator row is multiplied by alpha = exp(m_old - m) here, before
       the GEMM adds E W_c. Otherwise E <= e^TAU and alpha = 1: the accumulator row is left alone.
    fp16 E is stored times E_SHIFT (2^3), so its largest value e^8 x 8 stays under 65504 while values down to
    ~e^-19 of the row's reference stay normal; the pass divides the shift out of l (``Running.e_scale``).

``_kd_dh_rows_kernel``, one program per (row, H tile): the backward, no GEMM at all:
    dh = sum_scales ca_s pw_s + sum_j cb_j W[idx_j]
    (ca_s, cb: fp32 per-row coefficients from the fp64 row math; pw_s: the saved off-set mean head rows), summed
    in fp32 and cast to the input dtype once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .streamed import Excluded, Running

LAZY_TAU = 8.0  # log-space slack of the lazy reference max: E <= e^8 (2981)
E_SHIFT = {torch.float16: 8.0}  # constant factor on stored E per dtype (module docstring); 1 otherwise
K_TILE = 16  # excluded ids per step of the dh kernel's sparse loop


@triton.jit
def _offset_rows_fwd_kernel(
    s_ptr,  # (R, C) fp32 logits of this (row block, chunk), row stride C; excluded entries become -inf
    e_ptr,  # (S, R, C) out: E per logit scale, input dtype
    off_ptr,  # (R + 1,) int32 CSR offsets of each row's excluded hits in this chunk
    col_ptr,  # (hits,) int32 local column of each hit
    slot_ptr,  # (hits,) int64 flat position in the (N, kx) ids where the hit's logit is captured
    sx_ptr,  # (N * kx,) fp32 out: captured raw logits
    m_ptr,  # (S, N) fp32 running reference (lazy max) of c s over the off-set columns, in place
    l_ptr,  # (S, N) fp32 running sum of exp(c s - m) over the off-set columns, in place
    acc_ptr,  # (S, N, H) fp32 accumulator rows, rescaled in place when m moves (HAS_ACC)
    inv_ptr,  # (S,) fp32 logit scales c
    r0,
    C,
    N,
    H,
    e_shift,
    tau,
    S: tl.constexpr,
    TILE_C: tl.constexpr,
    TILE_H: tl.constexpr,
    HAS_ACC: tl.constexpr,
):
    r = tl.program_id(0)
    row = (r0 + r).to(tl.int64)  # global row
    srow = s_ptr + r.to(tl.int64) * C
    lo = tl.load(off_ptr + r)
    hi = tl.load(off_ptr + r + 1)
    for i in range(lo, hi):
        c = tl.load(col_ptr + i)
        tl.store(sx_ptr + tl.load(slot_ptr + i), tl.load(srow + c))
        tl.store(srow + c, float("-inf"))
    tl.debug_barrier()  # the -inf stores above are seen by every thread of the program below
    cols = tl.arange(0, TILE_C)
    hcols = tl.arange(0, TILE_H)
    for j in tl.static_range(S):
        it = tl.load(inv_ptr + j)
        m_old = tl.load(m_ptr + j * N + row)
        erow = e_ptr + (j * tl.num_programs(0) + r).to(tl.int64) * C
        # one read of the row: E against the current reference (0 before the row's first off-set column)
        m_ref = tl.where(m_old == float("-inf"), 0.0, m_old)
        mv = tl.full((TILE_C,), float("-inf"), tl.float32)
        sv = tl.zeros((TILE_C,), tl.float32)
        for c0 in range(0, C, TILE_C):
            ok = c0 + cols < C
            z = tl.load(srow + c0 + cols, mask=ok, other=float("-inf"))
            e = tl.exp(z * it - m_ref)
            tl.store(erow + c0 + cols, (e * e_shift).to(e_ptr.dtype.element_ty), mask=ok)
            sv += e
            mv = tl.maximum(mv, z)
        mx = tl.max(mv, 0) * it  # the chunk's off-set max of c s (-inf: every column excluded)
        move = mx > m_old + tau
        if move:  # the max beat the reference by more than TAU (or is the row's first): redo against it
            m_ref = mx
            sv = tl.zeros((TILE_C,), tl.float32)
            for c0 in range(0, C, TILE_C):
                ok = c0 + cols < C
                e = tl.exp(tl.load(srow + c0 + cols, mask=ok, other=float("-inf")) * it - m_ref)
                tl.store(erow + c0 + cols, (e * e_shift).to(e_ptr.dtype.element_ty), mask=ok)
                sv += e
        alpha = tl.where(move, tl.exp(m_old - m_ref), 1.0)  # 0 when nothing was accumulated yet
        tl.store(l_ptr + j * N + row, tl.load(l_ptr + j * N + row) * alpha + tl.sum(sv, 0))
        tl.store(m_ptr + j * N + row, tl.where(move, m_ref, m_old))
        if HAS_ACC:
            if (alpha < 1.0) & (alpha > 0.0):  # m moved after something was accumulated: rescale the row
                arow = acc_ptr + (j * N + row) * H
                for h0 in range(0, H, TILE_H):
                    ok_h = h0 + hcols < H
                    x = tl.load(arow + h0 + hcols, mask=ok_h, other=0.0)
                    tl.store(arow + h0 + hcols, x * alpha, mask=ok_h)


@triton.jit
def _kd_dh_rows_kernel(
    pw_ptr,  # (S, N, H) fp32 off-set mean head rows
    ca_ptr,  # (S, N) fp32 dense coefficient per scale
    idx_ptr,  # (N, KX) int64 excluded ids (clamped to [0, V))
    cb_ptr,  # (N, KX) fp32 sparse coefficients (0 where the id is not valid)
    w_ptr,  # (V, H) LM head, row stride stride_w
    dh_ptr,  # (N, H) out, input dtype
    N,
    H,
    KX,
    stride_w,
    S: tl.constexpr,
    TILE_H: tl.constexpr,
    K_TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    hc = tl.program_id(1) * TILE_H + tl.arange(0, TILE_H)
    ok_h = hc < H
    acc = tl.zeros((TILE_H,), tl.float32)
    for j in tl.static_range(S):
        ca = tl.load(ca_ptr + j * N + row)
        acc += ca * tl.load(pw_ptr + (j * N + row) * H + hc, mask=ok_h, other=0.0)
    kk = tl.arange(0, K_TILE)
    for i0 in range(0, KX, K_TILE):
        ok_k = i0 + kk < KX
        ids = tl.load(idx_ptr + row * KX + i0 + kk, mask=ok_k, other=0)
        cb = tl.load(cb_ptr + row * KX + i0 + kk, mask=ok_k, other=0.0)
        wk = tl.load(w_ptr + ids[:, None] * stride_w + hc[None, :], mask=ok_k[:, None] & ok_h[None, :], other=0.0)
        acc += tl.sum(cb[:, None] * wk.to(tl.float32), 0)
    tl.store(dh_ptr + row * H + hc, acc.to(dh_ptr.dtype.element_ty), mask=ok_h)


def check_triton_device(x: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors; CPU tensors only run under TRITON_INTERPRET=1 (tests)."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' needs CUDA tensors, got tensors on {x.device}; use impl='chunked' on CPU "
            "(or set TRITON_INTERPRET=1 before triton is imported, for tests)"
        )


def row_warps(tile: int) -> dict:
    """num_warps for a row program of ``tile`` elements per step (the interpreter ignores it)."""
    return {"num_warps": 8 if tile >= 1024 else 4}


def triton_row_step(s, ex: Excluded, blk: int, chunk: int, st: Running, r0: int, e_dtype) -> list[torch.Tensor]:
    """The row step of ``streamed.stream`` by ``_offset_rows_fwd_kernel``: returns E (R, C) per scale."""
    rows, c = s.shape
    n_s = len(st.scales)
    key = ("e", e_dtype)
    if key not in st.scratch:  # one E buffer per pass, sized for the largest (block, chunk)
        st.scratch[key] = torch.empty(n_s * ex.b.rows * ex.b.cols, dtype=e_dtype, device=s.device)
        st.scratch["inv"] = torch.tensor(st.scales, dtype=torch.float32, device=s.device)
        st.e_scale = E_SHIFT.get(e_dtype, 1.0)
    e = st.scratch[key][: n_s * rows * c].view(n_s, rows, c)
    acc = st.acc if st.acc is not None else st.m  # a placeholder pointer when there is no accumulator
    _offset_rows_fwd_kernel[(rows,)](
        s,
        e,
        ex.offsets(blk, chunk),
        ex.col,
        ex.slot,
        st.s_x,
        st.m,
        st.l,
        acc,
        st.scratch["inv"],
        r0,
        c,
        st.m.shape[1],
        acc.shape[-1],
        st.e_scale,
        LAZY_TAU,
        S=n_s,
        TILE_C=ex.b.tile_c,
        TILE_H=ex.b.tile_h,
        HAS_ACC=st.acc is not None,
        **row_warps(ex.b.tile_c),
    )
    return list(e.unbind(0))


def triton_dh(
    pw: torch.Tensor,
    ca: torch.Tensor,
    idx: torch.Tensor,
    cb: torch.Tensor,
    weight: torch.Tensor,
    dtype: torch.dtype,
    tile_h: int,
) -> torch.Tensor:
    """dh = sum_s ca_s pw_s + sum_j cb_j W[idx_j], in ``dtype``, by ``_kd_dh_rows_kernel``.

    Shape: pw (S, N, H) fp32, ca (S, N) fp32, idx (N, KX) long, cb (N, KX) fp32, weight (V, H) -> (N, H)
    """
    n_s, n, hd = pw.shape
    dh = torch.empty(n, hd, dtype=dtype, device=pw.device)
    if n:
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        _kd_dh_rows_kernel[(n, triton.cdiv(hd, tile_h))](
            pw,
            ca.contiguous(),
            idx.contiguous(),
            cb.contiguous(),
            w,
            dh,
            n,
            hd,
            idx.shape[1],
            w.stride(0),
            S=n_s,
            TILE_H=tile_h,
            K_TILE=K_TILE,
            **row_warps(tile_h),
        )
    return dh
