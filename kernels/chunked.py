"""Chunked PyTorch path (the CPU default): streams over vocabulary chunks, never holds an (N, V) tensor.

Forward, flash-attention style: per chunk of C vocabulary rows, s = (h / T) W_c^T (N, C); keep a running
row max m, running sum l = sum exp(s - m), and, when hidden needs a gradient, a running
acc = sum exp(s - m) W_c (N, H). At the end lse = m + log l and sum_v p_v W_v = acc / l, so the gradient
of every variant (SPEC section 2: g = a * p + b on K, a per row, b (N, k)) is available after one pass:
    dL/dh = (1/T) (a * sum_v p_v W_v + sum_K b_j W_j)
That is 2 GEMMs per chunk (4NHV FLOPs), the same as eager's forward + backward, with O(N H + N C) memory.
Only when ``weight`` requires grad does the backward stream the chunks again to form dW = g^T (h / T).
"""

from __future__ import annotations

import torch

from .options import KDOptions, TopkOptions
from .reference import derive_lse_t, log1mexp, math_dtype, row_losses_from_logp

GATHER_ELEMS = 1 << 20  # elements per (rows, k, H) block of gathered head rows W[ids]


def _row_blocks(n: int, k: int, h: int) -> range:
    return range(0, n, max(1, GATHER_ELEMS // max(1, k * h)))


def gathered_logits(h: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """s_K = h . W[idx] row by row, in row blocks so W[idx] never exceeds GATHER_ELEMS elements.

    Shape:
        h (N, H) math dtype, weight (V, H), idx (N, k) long in [0, V) -> (N, k)
    """
    out = h.new_empty(idx.shape)
    rb = _row_blocks(*idx.shape, h.shape[1]).step
    for r in range(0, idx.shape[0], rb):
        wk = weight[idx[r : r + rb]].to(h.dtype)  # (rb, k, H)
        out[r : r + rb] = torch.bmm(wk, h[r : r + rb, :, None])[..., 0]
    return out


def sparse_matvec(b: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_j b_j W[idx_j] per row, in row blocks. Shape: b (N, k), weight (V, H), idx (N, k) -> (N, H)."""
    out = b.new_empty(b.shape[0], weight.shape[1])
    rb = _row_blocks(*idx.shape, weight.shape[1]).step
    for r in range(0, idx.shape[0], rb):
        wk = weight[idx[r : r + rb]].to(b.dtype)  # (rb, k, H)
        out[r : r + rb] = torch.bmm(b[r : r + rb, None, :], wk)[:, 0]
    return out


def stream_lse(h: torch.Tensor, weight: torch.Tensor, chunk: int, with_pw: bool):
    """One pass over the vocabulary: lse (N,) of h W^T and, if ``with_pw``, sum_v softmax_v W_v (N, H)."""
    n = h.shape[0]
    m = h.new_full((n,), float("-inf"))
    l = h.new_zeros(n)
    acc = h.new_zeros(n, weight.shape[1]) if with_pw else None
    for v0 in range(0, weight.shape[0], chunk):
        wc = weight[v0 : v0 + chunk].to(h.dtype)  # (C, H)
        s = h @ wc.t()  # (N, C): the only chunk-sized buffer
        m_new = torch.maximum(m, s.amax(1))
        alpha = torch.exp(m - m_new)  # rescales what was accumulated against the old max
        e = s.sub_(m_new[:, None]).exp_()  # in place: exp(s - m_new)
        l = l * alpha + e.sum(1)
        if acc is not None:
            acc = torch.addmm(acc * alpha[:, None], e, wc)  # acc * alpha + e @ W_c
        m = m_new
    lse = m + torch.log(l)
    return lse, (acc / l[:, None] if acc is not None else None)


def kd_coefficients(lp_k: torch.Tensor, logq: torch.Tensor, valid: torch.Tensor, variant: str, vocab_size: int):
    """SPEC section 2 gradient wrt z/T as g = a[:, None] * p + b on K.

    tail: g = p (1 - r) off K and p - q on K with r = q_t / p_t, so a = 1 - r, b = r p_K - q_K.
    renorm: g = p off K and p - qn on K, so a = 1, b = -qn_K.

    Shape:
        lp_k (N, k) student log p on K, logq (N, k), valid (N, k) -> a (N,), b (N, k)
    """
    ninf = torch.full_like(logq, float("-inf"))
    log_qk = torch.logsumexp(torch.where(valid, logq, ninf), -1)  # (N,)
    zero = torch.zeros_like(logq)
    if variant == "renorm":
        return torch.ones_like(log_qk), torch.where(valid, -(logq - log_qk[:, None]).exp(), zero)
    log_qt = log1mexp(log_qk)
    log_pt = log1mexp(torch.logsumexp(torch.where(valid, lp_k, ninf), -1))
    has_tail = (log_qt > float("-inf")) & (valid.sum(-1) < vocab_size)  # as in row_losses_from_logp
    r = torch.where(has_tail, (log_qt - log_pt).exp(), torch.zeros_like(log_qt))  # 0/0 := 0
    b = torch.where(valid, r[:, None] * lp_k.exp() - logq.exp(), zero)
    return 1.0 - r, b


class _SparseKDChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts: KDOptions):
        dt = math_dtype(hidden, weight)
        T = opts.temperature
        h = hidden.to(dt) / T  # (N, H): temperature folded into the hidden state
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        lse, pw = stream_lse(h, weight, opts.chunk_size, with_pw=need_dh)  # (N,), (N, H)
        valid = topk_ids >= 0
        if mask is not None:
            valid = valid & mask.bool()[:, None]
        row_valid = valid.any(-1)  # (N,)
        idx = topk_ids.long().clamp(min=0)  # (N, k); padding points at id 0 and is masked by `valid`
        lp_k = gathered_logits(h, weight, idx) - lse[:, None]  # (N, k) student log p on K
        v = weight.shape[0]
        c = derive_lse_t(topk_ids, topk_logprobs, T, v) if lse_t is None else lse_t.to(dt)
        logq = topk_logprobs.to(dt) / T - c.to(dt)[:, None]  # (N, k)
        loss = row_losses_from_logp(lp_k, logq, valid, opts.variant, v)
        loss = torch.where(row_valid, loss, torch.zeros_like(loss)) * T**2
        n_valid = int(row_valid.sum())
        a, b = kd_coefficients(lp_k, logq, valid, opts.variant, v)
        a = torch.where(row_valid, a, torch.zeros_like(a))
        ctx.opts, ctx.n_valid, ctx.in_dtypes = opts, n_valid, (hidden.dtype, weight.dtype)
        ctx.save_for_backward(h if need_dw else None, weight, idx, a, b, lse, pw)
        if opts.reduction == "none":
            return loss
        return loss.sum() if opts.reduction == "sum" else loss.sum() / max(n_valid, 1)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, idx, a, b, lse, pw = ctx.saved_tensors
        opts: KDOptions = ctx.opts
        T = opts.temperature
        # per-row factor: upstream grad x reduction x T^2 x (1/T) from s = z / T
        w = grad_out.to(a.dtype) * T
        if opts.reduction == "mean":
            w = w / max(ctx.n_valid, 1)
        w = w.expand(a.shape) if w.dim() == 0 else w  # (N,)
        wa, wb = w * a, w[:, None] * b  # (N,), (N, k)
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = (wa[:, None] * pw + sparse_matvec(wb, weight, idx)).to(ctx.in_dtypes[0])
        if ctx.needs_input_grad[1]:
            # dW = T^2 g^T (h / T) = (w (a p + b))^T h = T (w (a p + b))^T h' with the saved h' = h / T;
            # p is recomputed chunk by chunk from the saved lse
            wa, wb = wa * T, wb * T
            dw32 = torch.empty(weight.shape, dtype=h.dtype, device=h.device)
            for v0 in range(0, weight.shape[0], opts.chunk_size):
                wc = weight[v0 : v0 + opts.chunk_size].to(h.dtype)
                p = (h @ wc.t()).sub_(lse[:, None]).exp_().mul_(wa[:, None])  # (N, C) = w a p
                dw32[v0 : v0 + opts.chunk_size] = p.t() @ h
            dw32.index_add_(0, idx.reshape(-1), (wb[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
            dw = dw32.to(ctx.in_dtypes[1])
        return dh, dw, None, None, None, None, None


def sparse_kd_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    lse_t: torch.Tensor | None,
    mask: torch.Tensor | None,
    opts: KDOptions,
) -> torch.Tensor:
    """Streaming sparse KD loss (see module docstring). Same contract as ``sparse_kd_loss``."""
    return _SparseKDChunked.apply(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts)


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
