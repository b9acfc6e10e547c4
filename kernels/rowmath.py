"""Row math of the KD losses, written once for every path: per distilled row (fp64, (N, k) sized), the
student's log p on K and off K, the divergences' row losses and their gradient coefficients (written without
cancellation), reductions, and the store's c_T. The eager reference (``reference``), the streamed paths and
the Triton row kernels' hosts all call these; the reference differs only in forming the full logits.
"""

from __future__ import annotations

import math

import torch

from .options import KDOptions


def math_dtype(*xs: torch.Tensor) -> torch.dtype:
    """fp32 for every float input dtype, fp64 if any input is fp64 (the oracle)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, -inf for x >= 0, stable at both ends and with NaN-free gradients.

    Uses log(-expm1(x)) near 0 and log1p(-exp(x)) far from it (Maechler 2012,
    https://cran.r-project.org/web/packages/Rmpfr/vignettes/log1mexp-note.pdf).
    """
    neg = x < 0
    xs = torch.where(neg, x, torch.full_like(x, -1.0))  # safe branch input: no inf/NaN gradients leak
    near = xs > -0.6931471805599453
    out = torch.where(near, torch.log(-torch.expm1(torch.where(near, xs, -1.0))), torch.log1p(-torch.exp(xs)))
    return torch.where(neg, out, torch.full_like(x, float("-inf")))


def log_mixture(lp: torch.Tensor, lq: torch.Tensor, beta: float) -> torch.Tensor:
    """log m, m = beta q + (1 - beta) p, from log p and log q. Where p or q is above 1/2, as
    log1p(beta expm1(lq) + (1 - beta) expm1(lp)): m_a's deficit from 1 survives when both are confident on a."""
    near = torch.maximum(lp, lq) > -math.log(2.0)
    far = torch.logaddexp(math.log(beta) + lq, math.log1p(-beta) + lp)
    lpn, lqn = torch.where(near, lp, 0.0), torch.where(near, lq, 0.0)  # safe inputs: no inf/NaN gradient leaks
    return torch.where(near, torch.log1p(beta * torch.expm1(lqn) + (1 - beta) * torch.expm1(lpn)), far)


def derive_lse_t(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float, vocab_size: int
) -> torch.Tensor:
    """c_T ~= LSE(l_K / T, log(1 - sum_K exp l) / T): the teacher tail treated as one token (SPEC section 1).

    A row whose K covers the whole vocabulary has no tail (its rounding residue is not a token).

    Shape:
        topk_ids (N, k), topk_logprobs (N, k) -> (N,) in the dtype of topk_logprobs' math (fp32/fp64)
    """
    dt = math_dtype(topk_logprobs)
    valid = topk_ids >= 0
    l = topk_logprobs.to(dt).masked_fill(~valid, float("-inf"))  # (N, k)
    log_tail = log1mexp(torch.logsumexp(l, -1).clamp(max=0.0))  # (N,) log of the teacher's tail mass at T=1
    log_tail = log_tail.masked_fill(valid.sum(-1) >= vocab_size, float("-inf"))
    return torch.logsumexp(torch.cat([l, log_tail[:, None]], -1) / temperature, -1)


# Reverse KL's tail term p_t log(p_t / q_t) is infinite when the stored teacher leaves no tail mass at all (q_t
# computes to exactly 0 in fp64 while K does not cover the vocabulary) and the student keeps p_t > 0. That
# happens with real stores: capture writes fp32 log-probs l = z - LSE(z), and once a confident teacher's tail is
# below the fp32 spacing of its logits (~1e-6 relative) the top log-prob rounds to 0 and the K mass to 1. Such a
# q_t is "too small for the store to resolve", not 0, so reverse KL uses q_t = QT_FLOOR there (2^-24, the fp32
# unit roundoff): the tail term is then a lower bound of the true one, and the gradient still pushes p_t down.
# Only exact zeros are floored; any q_t > 0 the store resolves (1e-8, 1e-30) is used as is. Forward KL and JSD
# are finite at q_t = 0 (0 log 0 = 0; m_t = (1 - beta) p_t > 0) and use no floor.
QT_FLOOR = 2.0**-24


def _outcomes(lp_k, logq, valid, vocab_size, log_pt, floor_qt: bool):
    """The SPEC's outcomes as (N, k + 1) columns: the K ids, then the tail (column k). Returns log p, log q (fp64)
    and which entries are outcomes: valid K ids, and the tail unless K covers the vocabulary. Entries that are
    not outcomes hold 0 (safe for autograd)."""
    lp_k, logq, log_pt = lp_k.double(), logq.double(), log_pt.double()
    log_qt = log1mexp(torch.logsumexp(torch.where(valid, logq, float("-inf")), -1))  # (N,)
    has_tail = valid.sum(-1) < vocab_size
    if floor_qt:
        log_qt = torch.where(has_tail & (log_qt == float("-inf")), math.log(QT_FLOOR), log_qt)
    ok = torch.cat([valid, has_tail[:, None]], 1)
    lp = torch.where(ok, torch.cat([lp_k, log_pt[:, None]], 1), 0.0)
    lq = torch.where(ok, torch.cat([logq, log_qt[:, None]], 1), 0.0)
    return lp, lq, ok


def _div_terms(lp, lq, ok, divergence: str, beta: float):
    """Per-outcome loss terms (N, k + 1) of reverse KL or JSD, and (r, s) such that dL/dp_o = s (r_o + const)."""
    p = torch.where(ok, lp.exp(), 0.0)
    if divergence == "reverse_kl":  # sum_o p_o log(p_o / q_o); dL/dp_o = log(p_o / q_o) + 1
        r = torch.where(ok, lp - lq, 0.0)
        return p * r, r, 1.0
    # jsd: beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p; dL/dp_o = (1 - beta) log(p_o / m_o)
    lq_ok = ok & (lq > float("-inf"))
    lm = torch.logaddexp(math.log(beta) + torch.where(lq_ok, lq, 0.0), math.log1p(-beta) + lp)
    lm = torch.where(lq_ok, lm, math.log1p(-beta) + lp)  # q_o = 0: m_o = (1 - beta) p_o
    r = torch.where(ok, lp - lm, 0.0)
    q = torch.where(lq_ok, lq.exp(), 0.0)
    return beta * q * torch.where(lq_ok, lq - lm, 0.0) + (1 - beta) * p * r, r, 1.0 - beta


def divergence_row_loss(lp_k, logq, valid, vocab_size, log_pt, divergence: str, beta: float) -> torch.Tensor:
    """Per-row reverse KL or JSD over the SPEC's outcomes (K ids plus the tail), fp64 (N,)."""
    lp, lq, ok = _outcomes(lp_k, logq, valid, vocab_size, log_pt, divergence == "reverse_kl")
    return _div_terms(lp, lq, ok, divergence, beta)[0].sum(-1)


def divergence_coefficients(lp_k, logq, valid, vocab_size, log_pt, divergence: str, beta: float):
    """Gradient of reverse KL / JSD wrt z/T in the SPEC's shape g = a (p_v / p_t) off K + b on K, in fp64.

    With dL/dp_o = s (r_o + const) and p_o the mass of outcome o, the chain rule through the softmax gives
    c_o = s p_o (r_o - sum_o' p_o' r_o') per outcome; a = c_tail, b = c_K. The outcome with the largest p takes
    -sum of the others instead (the c_o sum to 0): for a confident student r_top - sum p r is a difference of
    two nearly equal numbers, while each other c_o is a product of accurate factors.

    Shape:
        lp_k (N, k), logq (N, k), valid (N, k), log_pt (N,) -> a (N,), b (N, k) fp64
    """
    lp, lq, ok = _outcomes(lp_k, logq, valid, vocab_size, log_pt, divergence == "reverse_kl")
    _, r, s = _div_terms(lp, lq, ok, divergence, beta)
    p = torch.where(ok, lp.exp(), 0.0)
    c = torch.where(ok, p * (r - (p * r).sum(-1, keepdim=True)), 0.0) * s
    top = torch.where(ok, lp, float("-inf")).argmax(-1, keepdim=True)
    c = c.scatter(1, top, -c.scatter(1, top, 0.0).sum(-1, keepdim=True))
    c = torch.where(ok, c, 0.0)
    return c[:, -1], c[:, :-1]


def row_losses_from_logp(
    lp_k: torch.Tensor,
    logq: torch.Tensor,
    valid: torch.Tensor,
    variant: str,
    vocab_size: int,
    log_pt: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-row SPEC section 2 loss from the student's log p on K and the teacher's log q on K.

    ``log_pt`` is the student's off-K log mass, accumulated directly over the off-K tokens (never as
    1 - P_K: once p_t is below the fp32 resolution of P_K that difference rounds to 0 and the loss to inf).
    The (N, k) row math runs in float64 (it is tiny next to the GEMMs); the result has lp_k's dtype.
    When K covers the whole vocabulary, q_t = p_t = 0 exactly (their computed values are rounding residue).
    ``divergence`` "reverse_kl" / "jsd" (tail variant only) go to ``divergence_row_loss``.

    Shape:
        lp_k (N, k), logq (N, k), valid (N, k) bool, log_pt (N,) -> (N,)
    """
    out_dt = lp_k.dtype
    if divergence != "forward_kl":
        return divergence_row_loss(lp_k, logq, valid, vocab_size, log_pt, divergence, beta).to(out_dt)
    lp_k, logq = lp_k.double(), logq.double()
    ninf = torch.full_like(logq, float("-inf"))
    logq_m = torch.where(valid, logq, ninf)
    log_qk = torch.logsumexp(logq_m, -1)  # (N,) log Q_K
    lp_safe = torch.where(valid, lp_k, torch.zeros_like(lp_k))
    if variant == "renorm":
        logqn = torch.where(valid, logq - log_qk[:, None], torch.zeros_like(logq))
        return torch.where(valid, logqn.exp() * (logqn - lp_safe), torch.zeros_like(logq)).sum(-1).to(out_dt)
    q = logq_m.exp()
    loss_k = torch.where(valid, q * (torch.where(valid, logq, 0.0) - lp_safe), torch.zeros_like(logq)).sum(-1)
    log_qt = log1mexp(log_qk)  # (N,) log q_t, computed in log space
    log_pt = log_pt.double()
    has_tail = (log_qt > float("-inf")) & (valid.sum(-1) < vocab_size)  # 0 log 0 = 0: no tail, no tail term
    qt = torch.where(has_tail, log_qt, 0.0).exp()
    tail = torch.where(has_tail, qt * (torch.where(has_tail, log_qt, 0.0) - torch.where(has_tail, log_pt, 0.0)), 0.0)
    return (loss_k + tail).to(out_dt)


def student_logp_k(s_k: torch.Tensor, log_off: torch.Tensor, valid: torch.Tensor):
    """log p on K and log p_t in fp64, relative to the largest K logit M, so p_j near 1 keeps its deficit.

    lse = M + log1p(sum_{K, not argmax} exp(s_K - M) + exp(log_off - M)): when the student's top token leads by
    60, its log p is -exp(-60), which s_top - lse (two numbers near 60) would round to 0 even in fp64.

    Shape:
        s_k (N, k) student logits z/T on K, log_off (N,) off-K LSE of z/T, valid (N, k) -> lp_k (N, k), log_pt (N,)
    """
    s = s_k.double().masked_fill(~valid, float("-inf"))
    big, arg = s.max(-1)
    big = torch.where(torch.isfinite(big), big, log_off.double())  # no valid K id: the off-K LSE is the LSE
    big = torch.where(torch.isfinite(big), big, 0.0)
    # the argmax's difference is a constant 0, not s_top - big: under autograd that would add +1 and -1 to
    # s_top's gradient and round away the p_t-sized remainder (the whole gradient of a confident row)
    d = (s - big[:, None]).scatter(1, arg[:, None], 0.0)
    e = d.exp().scatter(1, arg[:, None], 0.0)  # argmax's own term (1) left out
    rest = e.sum(-1) + (log_off.double() - big).exp()
    rest = torch.where(torch.isfinite(s.amax(-1)), rest, rest - 1.0)  # no K term at all: rest counted 1 too many
    log_norm = torch.log1p(rest)  # lse - M
    d = torch.where(valid, d, float("-inf"))
    return d - log_norm[:, None], log_off.double() - big - log_norm


def offk_mask(topk_ids: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, V) bool: True on each row's valid K ids (duplicates and padding safe). Eager only."""
    hits = torch.zeros(topk_ids.shape[0], vocab_size, dtype=torch.int32, device=topk_ids.device)
    hits.scatter_add_(1, topk_ids.long().clamp(min=0), valid.int())
    return hits > 0


def reduce_rows(loss: torch.Tensor, row_valid: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """SPEC section 3: T^2 scaling; mean over valid rows (0 when none), sum, or per row."""
    loss = torch.where(row_valid, loss, torch.zeros_like(loss)) * opts.temperature**2
    if opts.reduction == "none":
        return loss
    if opts.reduction == "sum":
        return loss.sum()
    return loss.sum() / row_valid.sum().clamp(min=1)


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
