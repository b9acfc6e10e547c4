"""Production row math of the streamed KD paths: the gradient coefficients per row (fp64, (N, k) sized).

The loss itself and the student's log p on K come from ``reference`` (the spec's own row functions); what
only the streamed paths need, the gradient wrt z / T written without cancellation, lives here.
"""

from __future__ import annotations

import torch

from .reference import divergence_coefficients, log1mexp


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
