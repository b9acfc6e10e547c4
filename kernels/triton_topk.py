"""Triton row step of the teacher-capture pass (impl="triton"; CUDA, or CPU under TRITON_INTERPRET=1).

``topk_stream.topk_pass`` forms each (row block, vocabulary chunk) of logits z by the vendor GEMM; everything
after it is row-local and lives in ``_topk_rows_kernel``, one program per chunk row, no ``tl.dot`` (so the
interpreter runs it faithfully whatever the input dtype: it only ever sees fp32 logits):
    1. the chunk row's max (first read);
    2. m' = max(m, chunk max); l_T *= exp((m - m') / T) for every temperature column at once (TP, padded);
    3. second read, tile by tile: l_T += sum exp((z - m') / T); and only if the chunk's max beats the row's
       current k-th value kth (the early-out: otherwise no element can enter the buffer, so the merge is
       skipped and the buffer is neither read past its k-th value nor written), the tile's candidates
       (z > kth) enter the buffer by repeated max extraction: the largest candidate replaces the buffer's
       smallest live slot, kth is updated, and the loop stops as soon as no candidate beats the new kth. The
       number of iterations is the number of insertions: k on the first chunk, then about k C / (columns seen)
       per chunk for a row whose vocabulary order is unrelated to its logits (k (1 + ln(V / k)) in all).
The buffer is unordered; ``topk_stream.topk_results`` sorts it once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .options import TopkOptions
from .streamed import Blocking
from .topk_stream import TopkRunning, topk_pass, topk_results
from .triton_rows import check_triton_device, row_warps


@triton.jit
def _topk_rows_kernel(
    z_ptr,  # (R, C) fp32 logits of vocabulary columns [v0, v0 + C) for rows [r0, r0 + R), row stride C
    m_ptr,  # (N,) fp32 running max of z, in place
    l_ptr,  # (N, TP) fp32 running sum exp((z - m) / T) per temperature column, in place
    inv_ptr,  # (TP,) fp32 1 / T per column (padding columns: 1)
    val_ptr,  # (N, KP) fp32 top-k buffer values (first K slots live, unordered; -inf: empty), in place
    id_ptr,  # (N, KP) int64 their vocabulary ids (-1: empty), in place
    cnt_ptr,  # (N,) int32 chunks merged per row (the early-out's counter), in place
    r0,
    v0,
    C,
    K,
    KP: tl.constexpr,
    TP: tl.constexpr,
    TILE_C: tl.constexpr,
):
    r = tl.program_id(0)
    row = (r0 + r).to(tl.int64)  # global row
    zrow = z_ptr + r.to(tl.int64) * C
    cols = tl.arange(0, TILE_C)
    mv = tl.full((TILE_C,), float("-inf"), tl.float32)
    for c0 in range(0, C, TILE_C):
        mv = tl.maximum(mv, tl.load(zrow + c0 + cols, mask=c0 + cols < C, other=float("-inf")))
    mx = tl.max(mv, 0)  # the chunk row's max
    tcol = tl.arange(0, TP)
    inv = tl.load(inv_ptr + tcol)  # (TP,)
    m_old = tl.load(m_ptr + row)
    m_new = tl.maximum(m_old, mx)
    lrow = l_ptr + row * TP + tcol
    lv = tl.load(lrow) * tl.exp((m_old - m_new) * inv)  # (TP,); 0 on the first chunk (m_old = -inf, l = 0)
    kcol = tl.arange(0, KP)
    live = kcol < K
    vals = tl.load(val_ptr + row * KP + kcol)
    ids = tl.load(id_ptr + row * KP + kcol)
    kth, slot = tl.min(tl.where(live, vals, float("inf")), 0, return_indices=True)  # -inf until full
    merge = mx > kth  # else the early-out
    ev = tl.zeros((TILE_C, TP), tl.float32)
    for c0 in range(0, C, TILE_C):
        z = tl.load(zrow + c0 + cols, mask=c0 + cols < C, other=float("-inf"))  # (TILE_C,)
        ev += tl.exp((z[:, None] - m_new) * inv[None, :])
        if merge:
            x = tl.where(z > kth, z, float("-inf"))  # this tile's candidates
            t, p = tl.max(x, 0, return_indices=True)
            while t > kth:  # the largest candidate replaces the smallest live slot
                vals = tl.where(kcol == slot, t, vals)
                ids = tl.where(kcol == slot, (v0 + c0 + p).to(tl.int64), ids)
                x = tl.where(cols == p, float("-inf"), x)
                kth, slot = tl.min(tl.where(live, vals, float("inf")), 0, return_indices=True)
                t, p = tl.max(x, 0, return_indices=True)
    lv += tl.sum(ev, 0)
    tl.store(m_ptr + row, m_new)
    tl.store(lrow, lv)
    if merge:
        tl.store(val_ptr + row * KP + kcol, vals)
        tl.store(id_ptr + row * KP + kcol, ids)
        tl.store(cnt_ptr + row, tl.load(cnt_ptr + row) + 1)


def triton_topk_step(z: torch.Tensor, st: TopkRunning, r0: int, v0: int, b: Blocking) -> None:
    """The row step of ``topk_stream.topk_pass`` by ``_topk_rows_kernel``. Shape: z (R, C) fp32."""
    rows, c = z.shape
    if z.dtype != torch.float32:
        raise ValueError(f"the Triton top-k row step takes fp32 logits, got {z.dtype}")
    _topk_rows_kernel[(rows,)](
        z,
        st.m,
        st.l,
        st.inv,
        st.vals,
        st.ids,
        st.merges,
        r0,
        v0,
        c,
        st.k,
        KP=st.vals.shape[1],
        TP=st.l.shape[1],
        TILE_C=b.tile_c,
        **row_warps(b.tile_c),
    )


@torch.no_grad()
def topk_logprobs_triton(
    hidden: torch.Tensor, weight: torch.Tensor, opts: TopkOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_logprobs`` by the streamed pass with the Triton row step (fp32 math; fp64 inputs are refused).

    Shape: hidden (N, H), weight (V, H) -> ids (N, k) int64, logprobs (N, k) fp32, lse_t (N, nT) fp32
    """
    check_triton_device(hidden)
    if torch.float64 in (hidden.dtype, weight.dtype):
        raise ValueError("impl='triton' computes in fp32; for float64 inputs use impl='eager' or 'chunked'")
    return topk_results(topk_pass(hidden, weight, opts, triton_topk_step), opts)
