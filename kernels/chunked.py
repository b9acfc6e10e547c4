"""Chunked PyTorch path (the CPU default): streams over vocabulary chunks, never holds an (N, V) tensor.

Forward, flash-attention style: per chunk of C vocabulary rows, s = (h / T) W_c^T (N, C); keep a running
row max m and a running sum l_off = sum exp(s - m) over the columns not in K (K's entries are zeroed by an
index_fill on at most N k positions) and, when hidden needs a gradient, acc = sum_{v not in K} exp(s - m) W_v
(N, H). The student's off-K mass is thus summed directly, never as 1 - P_K, and with the K logits it gives
log p on K (``student_logp_k``). The gradient of every variant (docs/SPEC.md: g = a p_v / p_t off K, b on K)
is then available after one pass:
    dL/dh = (1/T) (a * sum_{v not in K} (p_v / p_t) W_v + sum_K b_j W_j)
That is 2 GEMMs per chunk (4NHV FLOPs), the same as eager's forward + backward, with O(N H + N C) memory.
Only when ``weight`` requires grad does the backward stream the chunks again to form dW = g^T (h / T).
"""

from __future__ import annotations

import torch

from .options import KDOptions, TopkOptions
from .reference import (
    derive_lse_t,
    divergence_coefficients,
    log1mexp,
    math_dtype,
    row_losses_from_logp,
    student_logp_k,
)

# Elements per (rows, k, H) block of gathered head rows W[ids], by device. On CPU, 2^20 (4 MB in fp32) keeps
# each block cache-sized. On a GPU every block is a gather plus a bmm launch: at 2^20, k = 64 and H = 2048 a
# block holds 8 rows, so N = 16k rows take 2,000 gather + bmm pairs, each launch-bound at ~10-15 us (20-30 ms
# in all, GPU idle between tiny kernels), about what the vocabulary GEMMs of the same step take on an H100 at
# V = 152k (4 N H V = 20 TFLOP at ~600 TFLOP/s: ~35 ms). Estimates, not measured here (no GPU). 2^25 elements
# (128 MB in fp32, transient) gives 256 rows per block: 64 pairs, well under 1 ms of launch overhead.
GATHER_ELEMS = {"cpu": 1 << 20, "cuda": 1 << 25}


# Elements of one (N, C) logit chunk: the streamed passes use C = min(chunk_size, CHUNK_ELEMS // N) vocabulary
# columns (at least MIN_CHUNK), so the chunk buffer and its exp stay at 8 MB in fp32 however long the batch: at
# N = 2048 that is C = 1024 (the bare-GEMM floor is fastest at 1,024-2,048 here, LOG.md); at N = 8192, C = 256.
# 2^22 (16 MB) was as fast but let glibc keep a freed 16 MiB buffer in its heap in most runs, so the N = 8192
# peak RSS read 48-66 MiB instead of 48-50 (LOG.md, 2026-12-04).
CHUNK_ELEMS = 1 << 21
MIN_CHUNK = 128
ROW_MATH_ROWS = 2048  # rows per block of the fp64 (rows, k) row math


def vocab_chunk(n: int, chunk_size: int) -> int:
    """Vocabulary columns per streamed chunk for ``n`` rows (see CHUNK_ELEMS); ``chunk_size`` is the upper bound."""
    return max(1, min(chunk_size, max(MIN_CHUNK, CHUNK_ELEMS // max(n, 1))))


def _row_blocks(n: int, k: int, h: int, device: torch.device) -> range:
    elems = GATHER_ELEMS.get(device.type, GATHER_ELEMS["cpu"])
    return range(0, n, max(1, elems // max(1, k * h)))


def gathered_logits(h: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """s_K = h . W[idx] row by row, in row blocks so W[idx] never exceeds GATHER_ELEMS[device] elements.

    Shape:
        h (N, H) math dtype, weight (V, H), idx (N, k) long in [0, V) -> (N, k)
    """
    out = h.new_empty(idx.shape)
    rb = _row_blocks(*idx.shape, h.shape[1], h.device).step
    for r in range(0, idx.shape[0], rb):
        wk = weight[idx[r : r + rb]].to(h.dtype)  # (rb, k, H)
        out[r : r + rb] = torch.bmm(wk, h[r : r + rb, :, None])[..., 0]
    return out


def sparse_matvec(b: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_j b_j W[idx_j] per row, in row blocks. Shape: b (N, k), weight (V, H), idx (N, k) -> (N, H)."""
    out = b.new_empty(b.shape[0], weight.shape[1])
    rb = _row_blocks(*idx.shape, weight.shape[1], b.device).step
    for r in range(0, idx.shape[0], rb):
        wk = weight[idx[r : r + rb]].to(b.dtype)  # (rb, k, H)
        out[r : r + rb] = torch.bmm(b[r : r + rb, None, :], wk)[:, 0]
    return out


class KByChunk:
    """Each row's valid K ids grouped by vocabulary chunk once (one sort of N k entries), so masking K in chunk
    [v0, v0 + c) costs a slice and an index_fill on its own entries, not an (N, k) pass per chunk."""

    def __init__(self, idx: torch.Tensor, valid: torch.Tensor, chunk: int, vocab_size: int) -> None:
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)[valid]
        ids = idx[valid]
        order = torch.argsort(ids)
        self.rows, self.ids, self.chunk = rows[order], ids[order], chunk
        edges = torch.arange(0, vocab_size + chunk, chunk, device=idx.device)  # one edge past the last chunk
        self.bounds = torch.searchsorted(self.ids, edges).tolist()  # ids sorted: chunk j is bounds[j]:bounds[j+1]

    def flat(self, v0: int, c: int) -> torch.Tensor:
        """Flat positions, in the (N, c) chunk starting at vocabulary row ``v0``, of the valid K ids there."""
        lo, hi = self.bounds[v0 // self.chunk], self.bounds[v0 // self.chunk + 1]
        return self.rows[lo:hi] * c + (self.ids[lo:hi] - v0)


def stream_offk(h, weight, chunk, with_pw, idx, valid, off_max=False, scales=(1.0,)):
    """One pass over the vocabulary with the K columns zeroed: the off-K sums, accumulated directly.

    For each logit scale c in ``scales`` (one per temperature, c = 1/T, applied to s = h W_c^T; ``h`` may carry
    the temperature already, then scales = (1,)) returns log_off (N,) = LSE over the columns not in K of c s,
    l_off (N,) the off-K sum against the running max of the whole row, and, if ``with_pw``, the off-K mean
    sum_{v not in K} softmax_off(v) W_v (N, H). One GEMM per chunk serves every scale (KD at T and CE at 1
    share the pass). The full LSE is never needed: log p on K comes from the K logits and log_off
    (``student_logp_k``). Against the whole row's max the off-K sum underflows once the off-K logits sit ~87
    below it; ``off_max=True`` runs the max over off-K columns only (the exact redo for those rows). No 1 - P_K.
    """
    n, last = h.shape[0], len(scales) - 1
    m = [h.new_full((n,), float("-inf")) for _ in scales]
    l_off = [h.new_zeros(n) for _ in scales]
    acc = [h.new_zeros(n, weight.shape[1]) if with_pw else None for _ in scales]
    kc = KByChunk(idx, valid, chunk, weight.shape[0])
    buf = h.new_empty(n * min(chunk, weight.shape[0]))  # one chunk buffer for the whole pass: no per-chunk malloc
    for v0 in range(0, weight.shape[0], chunk):
        wc = weight[v0 : v0 + chunk].to(h.dtype)  # (C, H)
        s0 = torch.mm(h, wc.t(), out=buf[: n * wc.shape[0]].view(n, wc.shape[0]))  # (N, C), in the buffer
        flat = kc.flat(v0, s0.shape[1])
        for j, c in enumerate(scales):
            s = (s0 if c == 1.0 else s0.mul_(c)) if j == last else s0 * c
            if off_max:
                s.view(-1).index_fill_(0, flat, float("-inf"))
            m_new = torch.maximum(m[j], s.amax(1))
            m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)  # a row with every column excluded so far
            alpha = torch.exp(m[j] - m_safe)  # rescales what was accumulated against the old max
            e = s.sub_(m_safe[:, None]).exp_()  # in place: exp(s - m_new)
            e.view(-1).index_fill_(0, flat, 0.0)  # K columns out: only off-K mass is summed
            l_off[j] = l_off[j] * alpha + e.sum(1)
            if acc[j] is not None:
                acc[j].mul_(alpha[:, None]).addmm_(e, wc)  # acc * alpha + e_off @ W_c, in place
            m[j] = m_safe
    out = []
    for j in range(len(scales)):
        pw = acc[j].div_(l_off[j].clamp(min=torch.finfo(h.dtype).tiny)[:, None]) if with_pw else None
        out.append((m[j] + torch.log(l_off[j]), l_off[j], pw))
    return out


# below this, the off-K sum taken against the full row max has lost fp32 precision (subnormal) or underflowed
OFFK_TINY = 1e-30


def exact_offk(h, weight, chunk, with_pw, idx, valid, scales=(1.0,)):
    """Off-K LSE and off-K mean head row per scale (lists), with rows whose off-K sum underflowed redone exactly."""
    res = stream_offk(h, weight, chunk, with_pw, idx, valid, scales=scales)
    redo = torch.stack([l_off < OFFK_TINY for _, l_off, _ in res]).any(0).nonzero()[:, 0]
    if redo.numel():
        again = stream_offk(h[redo], weight, chunk, with_pw, idx[redo], valid[redo], off_max=True, scales=scales)
        for (log_off, _, pw), (lo, _, pw_r) in zip(res, again):
            log_off[redo] = lo
            if pw is not None:
                pw[redo] = pw_r
    return [r[0] for r in res], [r[2] for r in res]


def kd_coefficients(lp_k, logq, valid, variant, vocab_size, log_pt, divergence="forward_kl", beta=0.5):
    """SPEC section 2 gradient wrt z/T as g = a * (p_v / p_t) off K plus b on K, cancellation-free, in fp64.

    tail: g = p (1 - q_t / p_t) off K and p - q on K, so a = p_t - q_t and b = p_K - q_K.
    renorm: g = p off K and p - qn on K, so a = p_t and b = p_K - qn_K.
    reverse_kl / jsd: ``divergence_coefficients`` (same shape).
    The dense term is then a * (off-K mean of W), never (1 - r) p + r p_K, which cancels when r = q_t / p_t is
    large (a confident student).

    Shape:
        lp_k (N, k) student log p on K, logq (N, k), valid (N, k), log_pt (N,) -> a (N,), b (N, k) fp64
    """
    if divergence != "forward_kl":
        return divergence_coefficients(lp_k, logq, valid, vocab_size, log_pt, divergence, beta)
    lp_k, logq, log_pt = lp_k.double(), logq.double(), log_pt.double()
    ninf = torch.full_like(logq, float("-inf"))
    log_qk = torch.logsumexp(torch.where(valid, logq, ninf), -1)  # (N,)
    zero = torch.zeros_like(logq)
    p_k = torch.where(valid, lp_k.exp(), zero)

    def p_minus(lq):  # p - q as q expm1(lp - lq): both are near 1 on a confident token, their difference matters
        return torch.where(valid, torch.where(lq > float("-inf"), lq.exp() * torch.expm1(lp_k - lq), p_k), zero)

    full = valid.sum(-1) >= vocab_size  # K is the vocabulary: no off-K outcome at all
    p_t = torch.where(full, 0.0, log_pt.exp())
    if variant == "renorm":
        return p_t, p_minus(logq - log_qk[:, None])
    log_qt = log1mexp(log_qk)
    has_tail = (log_qt > float("-inf")) & ~full  # as in row_losses_from_logp
    q_t = torch.where(has_tail, log_qt, float("-inf")).exp()
    return p_t - q_t, p_minus(logq)


def dense_form(a, b, lp_k, log_pt, valid):
    """The same gradient as g = a' * p + b' over the whole vocabulary (the Triton backward's shape).

    a' = a / p_t and b' = b - a' p_K. This re-adds the cancellation that ``kd_coefficients`` avoids;
    only the Triton path still uses it (its forward does not yet accumulate the off-K sums).
    """
    p_t = log_pt.double().exp()
    a2 = torch.where(p_t > 0, a / p_t.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return a2, torch.where(valid, b - a2[:, None] * lp_k.double().exp(), 0.0)


class _SparseKDChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts: KDOptions):
        dt = math_dtype(hidden, weight)
        T = opts.temperature
        h = hidden.to(dt)  # (N, H); no copy in the math dtype: 1/T scales each logit chunk in place
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = topk_ids >= 0
        if mask is not None:
            valid = valid & mask.bool()[:, None]
        row_valid = valid.any(-1)  # (N,)
        idx = topk_ids.long().clamp(min=0)  # (N, k); padding points at id 0 and is masked by `valid`
        # (N,) off-K LSE, (N, H) off-K mean head row: one streamed pass (plus exact redo rows)
        chunk = vocab_chunk(h.shape[0], opts.chunk_size)
        (log_off,), (pw,) = exact_offk(h, weight, chunk, need_dh, idx, valid, scales=(1.0 / T,))
        v = weight.shape[0]
        c = derive_lse_t(topk_ids, topk_logprobs, T, v) if lse_t is None else lse_t
        s_k = gathered_logits(h, weight, idx).mul_(1.0 / T)  # (N, k) student logits z/T on K
        loss = h.new_empty(h.shape[0])  # (N,) and the fp64 gradient coefficients a (N,), b (N, k), filled by blocks
        a, b = s_k.new_empty(h.shape[0], dtype=torch.float64), torch.empty_like(s_k, dtype=torch.float64)
        for r in range(0, h.shape[0], ROW_MATH_ROWS):  # fp64 row math in blocks: its temporaries stay small
            sl = slice(r, r + ROW_MATH_ROWS)
            # (R, k) student log p on K, (R,) its off-K log mass summed directly; both fp64
            lp_k, log_pt = student_logp_k(s_k[sl], log_off[sl], valid[sl])
            logq = topk_logprobs[sl].double() / T - c[sl].double()[:, None]  # (R, k) teacher math in fp64
            div = (opts.variant, v, log_pt, opts.divergence, opts.beta)
            loss[sl] = row_losses_from_logp(lp_k, logq, valid[sl], *div)
            a[sl], b[sl] = kd_coefficients(lp_k, logq, valid[sl], *div)
        loss = torch.where(row_valid, loss, torch.zeros_like(loss)) * T**2
        n_valid = int(row_valid.sum())
        a = torch.where(row_valid, a, torch.zeros_like(a))
        ctx.opts, ctx.n_valid, ctx.in_dtypes = opts, n_valid, (hidden.dtype, weight.dtype)
        ctx.save_for_backward(h / T if need_dw else None, weight, idx, valid, a, b, log_off, pw)
        if opts.reduction == "none":
            return loss
        return loss.sum() if opts.reduction == "sum" else loss.sum() / max(n_valid, 1)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, idx, valid, a, b, log_off, pw = ctx.saved_tensors
        opts: KDOptions = ctx.opts
        T = opts.temperature
        # per-row factor: upstream grad x reduction x T^2 x (1/T) from s = z / T; formed in fp64, one cast
        w = grad_out.double() * T
        if opts.reduction == "mean":
            w = w / max(ctx.n_valid, 1)
        w = w.expand(a.shape) if w.dim() == 0 else w  # (N,)
        wa, wb = w * a, w[:, None] * b  # (N,), (N, k)
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dt = pw.dtype
            dh = sparse_matvec(wb.to(dt), weight, idx).addcmul_(wa.to(dt)[:, None], pw).to(ctx.in_dtypes[0])
        if ctx.needs_input_grad[1]:
            # dW = T^2 g^T (h / T) = T (w g)^T h' with the saved h' = h / T; off K, g = a p_v / p_t is recomputed
            # chunk by chunk from the saved off-K LSE (K columns get their part from b below)
            dt = h.dtype
            wa, wb = (wa * T).to(dt), (wb * T).to(dt)
            dw32 = torch.empty(weight.shape, dtype=dt, device=h.device)
            chunk = vocab_chunk(h.shape[0], opts.chunk_size)
            kc = KByChunk(idx, valid, chunk, weight.shape[0])
            for v0 in range(0, weight.shape[0], chunk):
                wc = weight[v0 : v0 + chunk].to(dt)
                p = (h @ wc.t()).sub_(log_off[:, None]).exp_()  # (N, C) = p_v / p_t
                p.view(-1).index_fill_(0, kc.flat(v0, p.shape[1]), 0.0)
                p.mul_(wa[:, None])
                dw32[v0 : v0 + chunk] = p.t() @ h
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
