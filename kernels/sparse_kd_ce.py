"""KD and CE together: one pass over the LM head for the sparse KD loss at T and the label cross-entropy at 1.

Training with both ``kd_weight`` and ``ce_weight`` above zero used to stream the vocabulary twice (CE as a
sparse KD against a one-hot teacher). Here both come out of one streamed pass (docs/SPEC.md section 7). Let U
be each row's valid K ids plus its label: the pass sums, over the columns NOT in U, exp(z / T) and exp(z)
(two scales of the same chunk GEMM; one when T = 1) and their head-row means. What U adds to each off-set is
gathered on the host, so every off-set mass is still summed directly (SPEC section 4):
    KD off K      = off U  (+ the label, when it is not in K)
    CE off label  = off U  (+ the K ids other than the label)
Per row, the gradient wrt the raw logits z is then a dense part c * (off-U mean head row), once per scale,
plus a sparse vector on the k + 1 columns of U. The upstream grads of the two returned losses weight the two
parts in the backward, so ``kd_weight * kd + ce_weight * ce`` needs nothing else.
"""

from __future__ import annotations

import torch

from .options import KDOptions, check_impl, check_kd_inputs, head_shape
from .rowmath import derive_lse_t, kd_coefficients, row_losses_from_logp, student_logp_k
from .streamed import blocking, head_grad, off_results, stream
from .streamed_kd import dh_of, operands, row_step


def _lse2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp a + exp b), -inf when both are -inf (torch.logaddexp gives NaN there on some builds)."""
    return torch.logsumexp(torch.stack([a, b], -1), -1)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """exp(num - den) with 0 where den is -inf (no off-set mass at all: its coefficient is 0 anyway)."""
    return torch.where(torch.isfinite(den), (num - torch.where(torch.isfinite(den), den, 0.0)).exp(), 0.0)


def _reduce(loss: torch.Tensor, ok: torch.Tensor, reduction: str, scale: float):
    loss = torch.where(ok, loss, torch.zeros_like(loss)) * scale
    n = int(ok.sum())
    if reduction == "none":
        return loss, 1.0
    return (loss.sum(), 1.0) if reduction == "sum" else (loss.sum() / max(n, 1), 1.0 / max(n, 1))


class _SparseKDCEStreamed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, topk_ids, topk_logprobs, labels, lse_t, mask, opts: KDOptions, rows: str):
        T, k = opts.temperature, topk_ids.shape[1]
        h, w = operands(hidden, weight, rows)  # raw h: the scales 1/T and 1 are applied to each logit chunk
        v = w.shape[0]
        valid = topk_ids >= 0
        lab_ok = labels >= 0
        if mask is not None:
            valid, lab_ok = valid & mask.bool()[:, None], lab_ok & mask.bool()
        row_valid = valid.any(-1)
        idx, lab = topk_ids.long().clamp(min=0), labels.long().clamp(min=0)
        at_lab = (idx == lab[:, None]) & valid  # (N, k): the K entry that is the label, if any
        lab_in_k = at_lab.any(-1)
        lab_out = lab_ok & ~lab_in_k  # the label column excludes a token K does not already exclude
        u_idx = torch.cat([idx, lab[:, None]], 1)  # (N, k + 1)
        u_valid = torch.cat([valid, lab_out[:, None]], 1)
        scales = (1.0 / T, 1.0) if T != 1.0 else (1.0,)
        cut = blocking(h.shape[0], v, h.device, opts.chunk_size, opts.row_block)
        st = stream(h, w, u_idx, u_valid, scales, ctx.needs_input_grad[0], b=cut, **row_step(rows))
        log_u, pw_u = off_results(st)
        log_u = [x.double() for x in log_u]
        s_u = st.s_x.view(-1, k + 1).double()  # (N, k + 1) raw logits captured on U (0 where not valid)
        s_lab = torch.where(lab_in_k, s_u[:, :k].masked_fill(~at_lab, 0.0).sum(-1), s_u[:, k])  # label in K too
        s_u = torch.cat([s_u[:, :k], s_lab[:, None]], 1)
        ninf = torch.tensor(float("-inf"), dtype=torch.float64, device=h.device)
        # KD at T: off K = off U plus the label when it is outside K
        s_lab_t = torch.where(lab_out, s_u[:, k] / T, ninf)
        log_off_k = _lse2(log_u[0], s_lab_t)
        lp_k, log_pt = student_logp_k(s_u[:, :k] / T, log_off_k, valid)
        c = derive_lse_t(topk_ids, topk_logprobs, T, v) if lse_t is None else lse_t
        logq = topk_logprobs.double() / T - c.double()[:, None]
        div = (opts.variant, v, log_pt, opts.divergence, opts.beta)
        kd, kd_red = _reduce(row_losses_from_logp(lp_k, logq, valid, *div), row_valid, opts.reduction, T**2)
        a, b = kd_coefficients(lp_k, logq, valid, *div)
        a = torch.where(row_valid, a, 0.0)
        # CE at 1: off label = off U plus the valid K ids other than the label
        other_k = torch.where(valid & (idx != lab[:, None]), s_u[:, :k], ninf)
        log_off_l = torch.logsumexp(torch.cat([log_u[-1][:, None], other_k], 1), -1)
        one = lab_ok[:, None]
        lp_l, log_pt_l = student_logp_k(s_u[:, k:], log_off_l, one)
        zero = torch.zeros_like(lp_l)
        ce, ce_red = _reduce(row_losses_from_logp(lp_l, zero, one, "tail", v, log_pt_l), lab_ok, opts.reduction, 1.0)
        a_ce, b_ce = kd_coefficients(lp_l, zero, one, "tail", v, log_pt_l)  # a = p_t, b = p - 1 = expm1(log p)
        a_ce = torch.where(lab_ok, a_ce, 0.0)
        # dL/dz per unit upstream grad. KD: (1/T) T^2 red (a * off-K mean + b on K), and the off-K mean is
        # (off-U mass * off-U mean + p_label W_label) / off-K mass. CE: red (a_ce * off-label mean + b_ce W_label).
        kd_f = T * kd_red
        kd_dense = kd_f * a * _ratio(log_u[0], log_off_k)  # (N,) on pw_u[0]
        kd_sparse = kd_f * torch.cat([b, (a * _ratio(s_lab_t, log_off_k))[:, None]], 1)  # (N, k + 1) on U
        ce_dense = ce_red * a_ce * _ratio(log_u[-1], log_off_l)  # (N,) on pw_u[-1]
        ce_sparse = ce_red * torch.cat([a_ce[:, None] * _ratio(other_k, log_off_l[:, None]), b_ce], 1)
        ctx.opts, ctx.in_dtypes, ctx.scales, ctx.rows, ctx.cut = opts, (hidden.dtype, weight.dtype), scales, rows, cut
        ctx.save_for_backward(
            h if ctx.needs_input_grad[1] else None,
            w,
            u_idx,
            u_valid,
            kd_dense,
            kd_sparse,
            ce_dense,
            ce_sparse,
            *log_u,
            *pw_u,
        )
        return kd.to(st.m.dtype), ce.to(st.m.dtype)

    @staticmethod
    def backward(ctx, g_kd, g_ce):
        h, weight, u_idx, u_valid, kd_dense, kd_sparse, ce_dense, ce_sparse, *rest = ctx.saved_tensors
        n_s = len(ctx.scales)
        log_u, pw_u = rest[:n_s], rest[n_s:]
        zero = torch.zeros((), dtype=torch.float64, device=kd_dense.device)
        g_kd = zero if g_kd is None else g_kd.double()
        g_ce = zero if g_ce is None else g_ce.double()
        # per-row coefficients in fp64, combined, then one cast to the math dtype
        dense = [g_kd * kd_dense, g_ce * ce_dense]  # on the off-U mean at 1/T and at 1
        if n_s == 1:
            dense = [dense[0] + dense[1]]
        col = lambda g: g[:, None] if g.dim() else g  # noqa: E731  (reduction "none": per-row upstream grads)
        sparse = col(g_kd) * kd_sparse + col(g_ce) * ce_sparse  # (N, k + 1) on U
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = dh_of(ctx.rows, list(pw_u), dense, u_idx, sparse, weight, ctx.in_dtypes[0], ctx.cut.tile_h)
        if ctx.needs_input_grad[1]:
            dw = head_grad(h, weight, u_idx, u_valid, dense, sparse, log_u, ctx.scales, ctx.cut)
            dw = dw.to(ctx.in_dtypes[1])
        return dh, dw, None, None, None, None, None, None, None


def sparse_kd_ce_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    lse_t: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    variant: str = "tail",
    reduction: str = "mean",
    impl: str = "auto",
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd, ce): ``sparse_kd_loss`` of the same arguments and the cross-entropy -log softmax(hidden @ weight.T)
    [label] at T = 1, with the same ``reduction`` (mean over the rows with a valid label), from one pass over
    the head. Labels < 0 (or masked rows) are ignored by CE. ``impl="eager"`` is the two
    reference losses; "chunked" and "triton" share one streamed pass (the same logits GEMM serves T and 1).

    Shape:
        as ``sparse_kd_loss``, plus labels (N,) int in [-1, V) -> two () tensors, or two (N,) for "none"
    """
    from .sparse_kd import sparse_kd_loss

    opts = KDOptions(
        temperature=float(temperature), variant=variant, reduction=reduction, divergence=divergence, beta=beta
    )
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    impl = check_impl(impl, hidden.device, hidden.dtype, *head_shape(hidden, weight))
    check_kd_inputs(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, finite=impl != "triton")
    n = hidden.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64) or labels.shape != (n,):
        raise ValueError(f"labels must be an int32/int64 (N={n},) tensor, got {getattr(labels, 'shape', labels)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if n and (int(labels.min()) < -1 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(f"labels must lie in [0, V={weight.shape[0]}) or be -1 (ignored)")
    if impl == "eager":
        kd_args = dict(lse_t=lse_t, mask=mask, temperature=temperature, variant=variant, reduction=reduction)
        kd = sparse_kd_loss(
            hidden, weight, topk_ids, topk_logprobs, **kd_args, impl=impl, divergence=divergence, beta=beta
        )
        zeros = torch.zeros(n, 1, device=hidden.device)
        ce_args = dict(lse_t=zeros[:, 0], mask=mask, temperature=1.0, variant="tail", reduction=reduction, impl=impl)
        return kd, sparse_kd_loss(hidden, weight, labels[:, None], zeros, **ce_args)
    rows = "torch" if impl == "chunked" else "triton"
    return _SparseKDCEStreamed.apply(hidden, weight, topk_ids, topk_logprobs, labels, lse_t, mask, opts, rows)
