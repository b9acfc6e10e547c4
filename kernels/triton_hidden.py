"""Triton row kernels of the exact-teacher KD pass (``hidden_stream``, impl="triton"; CUDA, or CPU under
TRITON_INTERPRET=1). No ``tl.dot``: the GEMMs are torch's, so the interpreter runs these in fp32, fp16 and bf16.

``_hidden_kd_fwd_kernel``, one program per row r of a (row block, vocabulary chunk) tile; s holds the fp32 logits
of the student (row 2r) and the teacher (row 2r + 1), x = s / T, y = s / T:
    1. one read of both rows: the chunk's student max and argmax j, its max over the other columns, and the
       teacher's largest two (so its max over the columns other than j);
    2. the new references: a moves to j when x_j beats x_a (then the old a joins the off-a set); mo and mt are the
       running maxima of x and y over the off-a columns, so every E <= 1 (a confident row's tail stays in range);
    3. a second read: E = [e^{x - mo}, e^{y - mt}] (forward KL, MODE 0) or [e^{x - mo}, e^{x - mo} (d - c0)]
       (reverse KL, MODE 1), 0 at the new a, written in the input dtype; the off-a sums and the loss sum U in fp32
       (MODE 2, JSD's first pass: the sums only);
    4. the accumulator rows rescaled by exp(m_old - m_new) and the old a's head row added (a rank-1 update), here,
       before the caller's addmm adds E W_c.
    Derivation of what the sums become (loss, gradient): ``hidden_stream.finish`` and docs/SPEC.md section 9.

``_hidden_jsd_fwd_kernel``, JSD's second pass, one program per row: with both LSEs known, log p, log q,
log m = logaddexp(log beta + log q, log(1 - beta) + log p) and r = log p - log m per column, the loss terms
beta q (log q - log m) + (1 - beta) p r summed, and E = [e^{x - mo}, e^{x - mo} r] (0 at a).

fp16 E is stored times E_SHIFT (2^12 for rows bounded by 1, 2^4 for the rows holding a log-ratio factor), so
values down to ~e^-18 of the reference stay normal; ``finish`` divides the shifts out of the accumulator.
bf16 E is stored as its rounding and residue, two addmms (:func:`split_e`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_rows import row_warps

MODES = {"forward_kl": 0, "reverse_kl": 1, "lse": 2}


def e_shift(dtype: torch.dtype, mode: str) -> tuple[float, float]:
    """Constant factors on the two stored E rows (module docstring); 1 unless fp16."""
    if dtype != torch.float16:
        return (1.0, 1.0)
    return (4096.0, 4096.0 if mode == "forward_kl" else 16.0)


@triton.jit
def _store_e(p, v, ok, lo_off, SPLIT: tl.constexpr):
    """Store fp32 ``v`` at ``p`` in E's dtype; with SPLIT (bf16) also its rounding residue at ``p + lo_off``, so
    the two addmms together carry ~16 bits of E."""
    hi = v.to(p.dtype.element_ty)
    tl.store(p, hi, mask=ok)
    if SPLIT:
        tl.store(p + lo_off, (v - hi.to(tl.float32)).to(p.dtype.element_ty), mask=ok)


@triton.jit
def _top2(s_row, C, inv_t, TILE_C: tl.constexpr):
    """Over one row of C raw logits (scaled by inv_t): the max, the max of the other columns, the argmax."""
    cols = tl.arange(0, TILE_C)
    ninf = float("-inf")
    m = tl.full((), ninf, tl.float32)
    m2 = tl.full((), ninf, tl.float32)
    at = tl.full((), 0, tl.int32)
    for c0 in range(0, C, TILE_C):
        v = tl.load(s_row + c0 + cols, mask=c0 + cols < C, other=ninf) * inv_t
        tm = tl.max(v, 0)
        ti = tl.argmax(v, 0).to(tl.int32)
        t2 = tl.max(tl.where(cols == ti, ninf, v), 0)
        gt = tm > m
        m2 = tl.where(gt, tl.maximum(m, t2), tl.maximum(m2, tm))
        at = tl.where(gt, c0 + ti, at)
        m = tl.maximum(m, tm)
    return m, m2, at


@triton.jit
def _rescale_rows(arow, wrow, H, a0, a1, w0, w1, TILE_H: tl.constexpr):
    """The two accumulator rows at ``arow`` (2, H): row i times a_i plus w_i times the head row at ``wrow``."""
    hcols = tl.arange(0, TILE_H)
    for h0 in range(0, H, TILE_H):
        ok = h0 + hcols < H
        wv = tl.load(wrow + h0 + hcols, mask=ok, other=0.0).to(tl.float32)
        p0 = tl.load(arow + h0 + hcols, mask=ok, other=0.0)
        p1 = tl.load(arow + H + h0 + hcols, mask=ok, other=0.0)
        tl.store(arow + h0 + hcols, p0 * a0 + w0 * wv, mask=ok)
        tl.store(arow + H + h0 + hcols, p1 * a1 + w1 * wv, mask=ok)


@triton.jit
def _hidden_kd_fwd_kernel(
    s_ptr,  # (2R, C) fp32 raw logits of this (row block, chunk): student row 2r, teacher row 2r + 1
    e_ptr,  # (2R, C) out: E rows in the input dtype (MODE 0 / 1)
    xa_ptr,  # (N,) fp32 running student max x_a, in place
    mo_ptr,  # (N,) fp32 running off-a student max, in place
    mt_ptr,  # (N,) fp32 running off-a teacher max, in place
    lz_ptr,  # (N,) fp32 sum_{v != a} e^{x - mo}, in place
    lt_ptr,  # (N,) fp32 sum_{v != a} e^{y - mt}, in place
    ya_ptr,  # (N,) fp32 y at a, in place
    c0_ptr,  # (N,) fp32 the row's shift of d = y - x (set in its first chunk)
    u_ptr,  # (N,) fp32 loss sum U, in place
    a_ptr,  # (N,) int64 student argmax a, in place
    acc_ptr,  # (N, 2, H) fp32 accumulator rows (MODE 0 / 1), rescaled in place
    w_ptr,  # (V, H) LM head in the input dtype, row stride stride_w (the old a's row)
    r0,
    v0,
    C,
    H,
    stride_w,
    inv_t,
    sh0,
    sh1,
    lo_off,  # E's bf16 residue rows start this many elements after E's (SPLIT)
    MODE: tl.constexpr,
    SPLIT: tl.constexpr,
    TILE_C: tl.constexpr,
    TILE_H: tl.constexpr,
):
    r = tl.program_id(0)
    row = (r0 + r).to(tl.int64)
    sx = s_ptr + (2 * r).to(tl.int64) * C
    sy = sx + C
    cols = tl.arange(0, TILE_C)
    ninf = float("-inf")
    # 1. one read: student max / argmax / max of the rest, teacher's largest two
    xm, x2, j = _top2(sx, C, inv_t, TILE_C)
    ym, y2, yi = _top2(sy, C, inv_t, TILE_C)
    # 2. references
    xa = tl.load(xa_ptr + row)
    mo = tl.load(mo_ptr + row)
    mt = tl.load(mt_ptr + row)
    ya = tl.load(ya_ptr + row)
    yj = tl.load(sy + j) * inv_t
    new = xm > xa
    had = new & (xa > ninf)
    cand_x = tl.where(new, x2, xm)
    cand_y = tl.where(new, tl.where(yi == j, y2, ym), ym)
    old_x = tl.where(had, xa, ninf)
    old_y = tl.where(had, ya, ninf)
    mo_new = tl.maximum(tl.maximum(mo, cand_x), old_x)
    mt_new = tl.maximum(tl.maximum(mt, cand_y), old_y)
    mo_new = tl.where(mo_new > ninf, mo_new, 0.0)
    mt_new = tl.where(mt_new > ninf, mt_new, 0.0)
    az = tl.exp(mo - mo_new)
    at = tl.exp(mt - mt_new)
    c0v = tl.where(xa == ninf, yj - xm, tl.load(c0_ptr + row))
    w_z = tl.exp(old_x - mo_new)
    w_t = tl.exp(old_y - mt_new)
    dold = tl.where(had, ya - xa - c0v, 0.0)
    # 3. second read: E and the sums
    jx = tl.where(new, j, -1)  # the column to exclude: the new a (none when a stays)
    ex = e_ptr + (2 * r).to(tl.int64) * C
    sz_v = tl.zeros((TILE_C,), tl.float32)
    st_v = tl.zeros((TILE_C,), tl.float32)
    su_v = tl.zeros((TILE_C,), tl.float32)
    for c0 in range(0, C, TILE_C):
        ok = c0 + cols < C
        keep = ok & (c0 + cols != jx)
        x = tl.load(sx + c0 + cols, mask=ok, other=0.0) * inv_t
        y = tl.load(sy + c0 + cols, mask=ok, other=0.0) * inv_t
        ez = tl.where(keep, tl.exp(x - mo_new), 0.0)
        et = tl.where(keep, tl.exp(y - mt_new), 0.0)
        sz_v += ez
        st_v += et
        if MODE == 0:
            su_v += et * (y - x - c0v)
            _store_e(ex + c0 + cols, ez * sh0, ok, lo_off, SPLIT)
            _store_e(ex + C + c0 + cols, et * sh1, ok, lo_off, SPLIT)
        elif MODE == 1:
            e1 = ez * (y - x - c0v)
            su_v += e1
            _store_e(ex + c0 + cols, ez * sh0, ok, lo_off, SPLIT)
            _store_e(ex + C + c0 + cols, e1 * sh1, ok, lo_off, SPLIT)
    tl.store(lz_ptr + row, tl.load(lz_ptr + row) * az + tl.sum(sz_v, 0) + w_z)
    tl.store(lt_ptr + row, tl.load(lt_ptr + row) * at + tl.sum(st_v, 0) + w_t)
    a_old = tl.load(a_ptr + row)
    if MODE != 2:
        a1 = tl.where(MODE == 0, at, az)  # the second row's rescale: teacher (forward) or student (reverse)
        uw = tl.where(MODE == 0, w_t, w_z)
        w1 = tl.where(MODE == 0, w_t, w_z * dold)  # the old a's weight in the second row
        tl.store(u_ptr + row, tl.load(u_ptr + row) * a1 + tl.sum(su_v, 0) + uw * dold)
        # 4. rescale both accumulator rows and add the old a's head row (only when something moved)
        if (az != 1.0) | (a1 != 1.0) | had:
            _rescale_rows(acc_ptr + row * 2 * H, w_ptr + a_old * stride_w, H, az, a1, w_z * sh0, w1 * sh1, TILE_H)
    tl.store(a_ptr + row, tl.where(new, (v0 + j).to(tl.int64), a_old))
    tl.store(ya_ptr + row, tl.where(new, yj, ya))
    tl.store(xa_ptr + row, tl.maximum(xa, xm))
    tl.store(mo_ptr + row, mo_new)
    tl.store(mt_ptr + row, mt_new)
    tl.store(c0_ptr + row, c0v)


@triton.jit
def _hidden_jsd_fwd_kernel(
    s_ptr,  # (2R, C) fp32 raw logits: student row 2r, teacher row 2r + 1
    e_ptr,  # (2R, C) out: E = [e^{x - mo}, e^{x - mo} r] in the input dtype
    lsez_ptr,  # (N,) fp32 student LSE A
    lset_ptr,  # (N,) fp32 teacher LSE B
    mo_ptr,  # (N,) fp32 off-a student max (the E reference)
    a_ptr,  # (N,) int64 student argmax (excluded)
    u_ptr,  # (N,) fp32 loss sum, in place
    p0_ptr,  # (N,) fp32 sum_{v != a} e^{x - mo}, in place
    r1_ptr,  # (N,) fp32 sum_{v != a} e^{x - mo} r, in place
    r0,
    v0,
    C,
    inv_t,
    log_b,
    log_1mb,
    beta,
    sh0,
    sh1,
    lo_off,
    SPLIT: tl.constexpr,
    TILE_C: tl.constexpr,
):
    r = tl.program_id(0)
    row = (r0 + r).to(tl.int64)
    sx = s_ptr + (2 * r).to(tl.int64) * C
    ex = e_ptr + (2 * r).to(tl.int64) * C
    lse_z = tl.load(lsez_ptr + row)
    lse_t = tl.load(lset_ptr + row)
    mo = tl.load(mo_ptr + row)
    ac = (tl.load(a_ptr + row) - v0).to(tl.int32)  # a's column in this chunk (maybe outside it)
    cols = tl.arange(0, TILE_C)
    su = tl.zeros((TILE_C,), tl.float32)
    sp = tl.zeros((TILE_C,), tl.float32)
    sr = tl.zeros((TILE_C,), tl.float32)
    for c0 in range(0, C, TILE_C):
        ok = c0 + cols < C
        keep = ok & (c0 + cols != ac)
        x = tl.load(sx + c0 + cols, mask=ok, other=0.0) * inv_t
        y = tl.load(sx + C + c0 + cols, mask=ok, other=0.0) * inv_t
        lp = x - lse_z
        lq = y - lse_t
        ub = log_b + lq
        up = log_1mb + lp
        mx = tl.maximum(ub, up)
        lm = mx + tl.log(tl.exp(ub - mx) + tl.exp(up - mx))
        rr = lp - lm
        ell = beta * tl.exp(lq) * (lq - lm) + (1.0 - beta) * tl.exp(lp) * rr
        e0 = tl.where(keep, tl.exp(x - mo), 0.0)
        e1 = e0 * rr
        su += tl.where(keep, ell, 0.0)
        sp += e0
        sr += e1
        _store_e(ex + c0 + cols, e0 * sh0, ok, lo_off, SPLIT)
        _store_e(ex + C + c0 + cols, e1 * sh1, ok, lo_off, SPLIT)
    tl.store(u_ptr + row, tl.load(u_ptr + row) + tl.sum(su, 0))
    tl.store(p0_ptr + row, tl.load(p0_ptr + row) + tl.sum(sp, 0))
    tl.store(r1_ptr + row, tl.load(r1_ptr + row) + tl.sum(sr, 0))


def split_e(dtype: torch.dtype) -> bool:
    """bf16 E is written as two bf16 parts, its rounding and the residue (two addmms): one bf16 E loses the
    gradient where p ~ q, since G = sum p W - sum q W cancels between the two accumulator rows (8 bits of E
    against 16 for fp16's 11-bit mantissa with its range shift)."""
    return dtype == torch.bfloat16


def _e_buffer(s: torch.Tensor, st, dtype: torch.dtype) -> torch.Tensor:
    """E in ``dtype`` from one buffer per pass, sized for the largest (block, chunk): (2R, C), or (2, 2R, C) when
    :func:`split_e` (the rounded part, then the residue)."""
    key, parts = ("e", dtype), 2 if split_e(dtype) else 1
    if key not in st.scratch or st.scratch[key].numel() < parts * s.numel():
        st.scratch[key] = torch.empty(parts * s.numel(), dtype=dtype, device=s.device)
    e = st.scratch[key][: parts * s.numel()]
    return e.view(parts, *s.shape) if parts == 2 else e.view(s.shape)


def triton_online_step(s, st, r0: int, v0: int, weight, mode: str, inv_t: float, tiles=(32, 16)):
    """``hidden_stream.torch_online_step`` by ``_hidden_kd_fwd_kernel``: returns E (:func:`_e_buffer`; None for
    "lse")."""
    rows2, c = s.shape
    sh = e_shift(weight.dtype, mode)
    st.e_scale = sh
    e = _e_buffer(s, st, weight.dtype) if mode != "lse" else s
    acc = st.acc if st.acc is not None else st.lz
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    tile_c, tile_h = st.scratch.get("tiles", tiles)
    _hidden_kd_fwd_kernel[(rows2 // 2,)](
        s,
        e,
        st.xa,
        st.mo,
        st.mt,
        st.lz,
        st.lt,
        st.ya,
        st.c0,
        st.u,
        st.a,
        acc,
        w,
        r0,
        v0,
        c,
        w.shape[1],
        w.stride(0),
        inv_t,
        sh[0],
        sh[1],
        s.numel(),
        MODE=MODES[mode],
        SPLIT=mode != "lse" and split_e(weight.dtype),
        TILE_C=tile_c,
        TILE_H=tile_h,
        **row_warps(tile_c),
    )
    return None if mode == "lse" else e


def triton_jsd_step(s, st, r0: int, v0: int, inv_t: float, lse_z, lse_t, beta: float, dtype=None):
    """``hidden_stream.torch_jsd_step`` by ``_hidden_jsd_fwd_kernel``: returns E (:func:`_e_buffer`)."""
    rows2, c = s.shape
    dtype = dtype or st.scratch["e_dtype"]
    sh = e_shift(dtype, "jsd")
    st.e_scale = sh
    e = _e_buffer(s, st, dtype)
    tile_c = st.scratch.get("tiles", (32, 16))[0]
    _hidden_jsd_fwd_kernel[(rows2 // 2,)](
        s,
        e,
        lse_z,
        lse_t,
        st.mo,
        st.a,
        st.u,
        st.p0,
        st.r1,
        r0,
        v0,
        c,
        inv_t,
        math.log(beta),
        math.log1p(-beta),
        beta,
        sh[0],
        sh[1],
        s.numel(),
        SPLIT=split_e(dtype),
        TILE_C=tile_c,
        **row_warps(tile_c),
    )
    return e
