"""Exact-teacher KD from the teacher's final hidden states (docs/SPEC.md section 9): public op and eager reference.

In self-distillation the teacher and the student share the frozen LM head W, so the teacher's final hidden state
fixes its whole distribution: q = softmax(t_h W^T / T). ``hidden_kd_loss`` is the full-vocabulary divergence
between q and the student's p = softmax(h W^T / T), never materialising an (N, V) tensor except in
``impl="eager"``; the streamed paths live in ``hidden_stream`` (torch row steps) and ``triton_hidden``.
"""

from __future__ import annotations

import torch

from .options import KDOptions, check_finite, check_head, check_impl, head_shape
from .rowmath import log_mixture, math_dtype, reduce_rows


def hidden_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """Full-vocabulary distillation loss against a teacher given by its final hidden states, through the shared
    frozen head: T^2 x D(q, p) with q = softmax(``teacher_hidden`` W^T / T), p = softmax(``hidden`` W^T / T).

    ``divergence``: "forward_kl" KL(q || p), "reverse_kl" KL(p || q) or "jsd" (``beta`` KL(q || m) +
    (1 - ``beta``) KL(p || m), m = ``beta`` q + (1 - ``beta``) p), the conventions of ``sparse_kd_loss``.
    ``mask`` selects rows; ``reduction`` "mean" over selected rows (0 when none), "sum" or "none" (masked rows 0).
    ``impl``: "auto" (Triton on CUDA, chunked elsewhere; eager for small heads off CUDA, as ``sparse_kd_loss``),
    "eager" (full (N, V) logits: the readable reference, float64-capable), "chunked" or "triton" (streamed over
    vocabulary chunks: forward and reverse KL in one pass, 8NHV FLOPs; JSD in two passes, 12NHV; SPEC section 9).

    Gradients flow to ``hidden`` only. The teacher is a constant target (``teacher_hidden`` is used detached) and
    the head must be frozen: a ``weight`` that requires grad is refused with a ValueError (pass
    ``weight.detach()`` to train the rest against a fixed head).

    Shape:
        hidden (N, H), weight (V, H), teacher_hidden (N, H), mask (N,) bool -> () for mean/sum, (N,) for none;
        fp32 (fp64 if an input is fp64)
    """
    opts = KDOptions(temperature=float(temperature), reduction=reduction, divergence=divergence, beta=beta)
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    impl = check_impl(impl, hidden.device, hidden.dtype, *head_shape(hidden, weight))
    check_hidden_inputs(hidden, weight, teacher_hidden, mask, finite=impl != "triton")
    if impl == "eager":
        return hidden_kd_eager(hidden, weight, teacher_hidden, mask, opts)
    from .hidden_stream import hidden_kd_streamed

    return hidden_kd_streamed(hidden, weight, teacher_hidden, mask, opts, "torch" if impl == "chunked" else "triton")


def check_hidden_inputs(hidden, weight, teacher_hidden, mask, *, finite: bool) -> None:
    """Validate ``hidden_kd_loss`` inputs before any launch; a ValueError says what was expected."""
    check_head(hidden, weight, finite=finite)
    if weight.requires_grad:
        raise ValueError("hidden_kd_loss needs a frozen head: weight.requires_grad is True (pass weight.detach())")
    if not isinstance(teacher_hidden, torch.Tensor) or not teacher_hidden.is_floating_point():
        raise ValueError(f"teacher_hidden must be a float tensor, got {getattr(teacher_hidden, 'dtype', None)}")
    if teacher_hidden.shape != hidden.shape:
        raise ValueError(f"teacher_hidden must match hidden {tuple(hidden.shape)}, got {tuple(teacher_hidden.shape)}")
    if teacher_hidden.device != hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but hidden is on {hidden.device}")
    if finite:
        check_finite("teacher_hidden", teacher_hidden)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != (hidden.shape[0],):
            raise ValueError(f"mask must be a (N={hidden.shape[0]},) tensor, got {getattr(mask, 'shape', mask)}")
        if mask.device != hidden.device:
            raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")


def log_softmax_at_max(x: torch.Tensor) -> torch.Tensor:
    """log softmax relative to each row's largest entry a: d = x - x_a (the argmax's own d is the constant 0, not
    x_a - x_a) and log p = d - log1p(sum_{v != a} e^{d_v}). At a lead of 60, log p_a = -e^-60 survives (x_a - LSE
    rounds it to 0 even in float64), and autograd gives x_a the gradient -sum_{v != a} g_v, a sum of small terms.

    Shape: x (N, V) -> (N, V)
    """
    a = x.argmax(-1, keepdim=True)
    d = (x - x.gather(1, a)).scatter(1, a, 0.0)
    rest = d.exp().scatter(1, a, 0.0).sum(-1, keepdim=True)
    return d - torch.log1p(rest)


def divergence_rows(lp: torch.Tensor, lq: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence over the whole vocabulary from log p (student) and log q (teacher). Shape: (N, V) -> (N,)"""
    p, q = lp.exp(), lq.exp()
    if divergence == "forward_kl":
        return (q * (lq - lp)).sum(-1)
    if divergence == "reverse_kl":
        return (p * (lp - lq)).sum(-1)
    lm = log_mixture(lp, lq, beta)
    return (beta * q * (lq - lm) + (1 - beta) * p * (lp - lm)).sum(-1)


def hidden_kd_eager(hidden, weight, teacher_hidden, mask, opts: KDOptions) -> torch.Tensor:
    """The spec in code: both full (N, V) logits, log-softmax relative to the row max, the divergence summed over
    the vocabulary, SPEC section 3's reduction. Differentiable wrt ``hidden`` by autograd (the teacher and the
    head are constants); run in float64 it is the tests' oracle.

    Shape: hidden (N, H), weight (V, H), teacher_hidden (N, H), mask (N,) -> () for mean/sum, (N,) for none
    """
    dt = math_dtype(hidden, weight, teacher_hidden)
    T = opts.temperature
    w = weight.detach().to(dt)
    lp = log_softmax_at_max(hidden.to(dt) @ w.t() / T)  # (N, V) student
    with torch.no_grad():
        lq = log_softmax_at_max(teacher_hidden.detach().to(dt) @ w.t() / T)  # (N, V) teacher
    loss = divergence_rows(lp, lq, opts.divergence, opts.beta)
    row_valid = torch.ones_like(loss, dtype=torch.bool) if mask is None else mask.bool()
    return reduce_rows(loss, row_valid, opts)
