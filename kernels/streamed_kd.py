"""Sparse KD on the streamed pass (``streamed.stream``): impl="chunked" (torch row step) and impl="triton"
(Triton row kernels), one autograd Function for both.

Forward: one pass over the head with the K ids excluded gives the student's off-K LSE, the off-K mean head row
pw (when hidden needs a gradient) and the K logits. The float64 row math (``student_logp_k``,
``row_losses_from_logp``, ``kd_coefficients``) turns them into the loss and the gradient wrt z / T in the
shape g = a (p_v / p_t) off K plus b on K (docs/SPEC.md section 2). Backward, with w the per-row factor
(upstream grad x reduction x T^2 x 1/T):
    dL/dh = (w a) pw + sum_K (w b_j) W_j
a per-row scale of the saved accumulator plus a K part: no second pass over the head. Only a head that
requires grad streams again (``streamed.head_grad``).
"""

from __future__ import annotations

import torch

from .options import KDOptions
from .rowmath import derive_lse_t, kd_coefficients, math_dtype, row_losses_from_logp, student_logp_k
from .streamed import blocking, head_grad, off_results, sparse_matvec, stream, torch_rows

ROW_MATH_ROWS = 2048  # rows per block of the fp64 (rows, k) row math


def operands(hidden: torch.Tensor, weight: torch.Tensor, rows: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass's inputs. torch rows: hidden in the math dtype (fp32, fp64 for the oracle), the head as it is
    (widened chunk by chunk). triton rows: both in one dtype (fp32 / fp16 / bf16), as the vendor GEMM takes them."""
    if rows == "torch":
        return hidden.to(math_dtype(hidden, weight)), weight
    from .triton_rows import check_triton_device

    check_triton_device(hidden)
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    if dt == torch.float64:
        raise ValueError("impl='triton' takes fp32/fp16/bf16 inputs; use impl='chunked' for float64")
    return hidden.to(dt), weight.to(dt)


def row_step(rows: str) -> dict:
    """``stream``'s row-step arguments for ``rows``: the torch step, or the Triton kernel with per-row CSR."""
    if rows == "triton":
        from .triton_rows import triton_row_step

        return {"step": triton_row_step, "per_row": True}
    return {"step": torch_rows, "per_row": False}


def dh_of(rows, pw, ca, idx, cb, weight, dtype, tile_h) -> torch.Tensor:
    """dh = sum_s ca_s pw_s + sum_j cb_j W[idx_j] in ``dtype``: tensor ops, or the Triton row kernel.

    Shape: pw list of (N, H), ca list of (N,) fp64, idx (N, kx), cb (N, kx) fp64 -> (N, H)
    """
    if rows == "triton":
        from .triton_rows import triton_dh

        return triton_dh(torch.stack(pw), torch.stack(ca).float(), idx, cb.float(), weight, dtype, tile_h)
    dt = pw[0].dtype
    dh = sparse_matvec(cb.to(dt), weight, idx)
    for c, p in zip(ca, pw):
        dh.addcmul_(c.to(dt)[:, None], p)
    return dh.to(dtype)


class _SparseKDStreamed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts: KDOptions, rows: str):
        T = opts.temperature
        h, w = operands(hidden, weight, rows)
        n, v, k = h.shape[0], w.shape[0], topk_ids.shape[1]
        need_dh = ctx.needs_input_grad[0]
        valid = topk_ids >= 0
        if mask is not None:
            valid = valid & mask.bool()[:, None]
        row_valid = valid.any(-1)  # (N,)
        idx = topk_ids.long().clamp(min=0)  # (N, k); padding points at id 0 and is masked by `valid`
        b = blocking(n, v, h.device, opts.chunk_size, opts.row_block)
        st = stream(h, w, idx, valid, (1.0 / T,), need_dh, b=b, **row_step(rows))
        (log_off,), (pw,) = off_results(st)  # (N,) off-K LSE of z / T, (N, H) off-K mean head row
        s_k = st.s_x.view(n, k) / T  # (N, k) student logits z / T on K (0 where not valid)
        c = derive_lse_t(topk_ids, topk_logprobs, T, v) if lse_t is None else lse_t
        loss = torch.empty(n, dtype=st.m.dtype, device=h.device)
        a = torch.empty(n, dtype=torch.float64, device=h.device)
        bk = torch.empty(n, k, dtype=torch.float64, device=h.device)
        for r in range(0, n, ROW_MATH_ROWS):  # fp64 row math in blocks: its temporaries stay small
            sl = slice(r, r + ROW_MATH_ROWS)
            lp_k, log_pt = student_logp_k(s_k[sl], log_off[sl], valid[sl])  # fp64
            logq = topk_logprobs[sl].double() / T - c[sl].double()[:, None]  # (R, k) teacher log q, fp64
            div = (opts.variant, v, log_pt, opts.divergence, opts.beta)
            loss[sl] = row_losses_from_logp(lp_k, logq, valid[sl], *div)
            a[sl], bk[sl] = kd_coefficients(lp_k, logq, valid[sl], *div)
        loss = torch.where(row_valid, loss, torch.zeros_like(loss)) * T**2
        a = torch.where(row_valid, a, torch.zeros_like(a))
        ctx.opts, ctx.rows, ctx.b, ctx.n_valid = opts, rows, b, int(row_valid.sum())
        ctx.in_dtypes = (hidden.dtype, weight.dtype)
        ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, w, idx, valid, a, bk, log_off, pw)
        if opts.reduction == "none":
            return loss
        return loss.sum() if opts.reduction == "sum" else loss.sum() / max(ctx.n_valid, 1)

    @staticmethod
    def backward(ctx, grad_out):
        h, w, idx, valid, a, bk, log_off, pw = ctx.saved_tensors
        opts: KDOptions = ctx.opts
        T = opts.temperature
        # per-row factor: upstream grad x reduction x T^2 x (1/T) from s = z / T; formed in fp64
        wr = grad_out.double() * T / (max(ctx.n_valid, 1) if opts.reduction == "mean" else 1)
        wr = wr.expand(a.shape) if wr.dim() == 0 else wr  # (N,)
        wa, wb = wr * a, wr[:, None] * bk  # (N,), (N, k); bk is 0 where not valid
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = dh_of(ctx.rows, [pw], [wa], idx, wb, w, ctx.in_dtypes[0], ctx.b.tile_h)
        if ctx.needs_input_grad[1]:
            dw = head_grad(h, w, idx, valid, [wa], wb, [log_off], (1.0 / T,), ctx.b).to(ctx.in_dtypes[1])
        return dh, dw, None, None, None, None, None, None


def sparse_kd_streamed(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts: KDOptions, rows: str):
    """Streamed sparse KD loss (module docstring); ``rows`` "torch" (impl="chunked") or "triton". Same contract
    as ``sparse_kd_loss`` after validation."""
    return _SparseKDStreamed.apply(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts, rows)


def sparse_kd_chunked(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts: KDOptions) -> torch.Tensor:
    """impl="chunked": the streamed pass with the torch row step."""
    return sparse_kd_streamed(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts, "torch")


def sparse_kd_triton(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts: KDOptions) -> torch.Tensor:
    """impl="triton": the streamed pass with the Triton row kernels."""
    return sparse_kd_streamed(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts, "triton")
