"""Public sparse top-k KD loss: LM head x temperature KL against a sparse teacher (docs/SPEC.md sections 1-4 and 6)."""

from __future__ import annotations

import torch

from .options import KDOptions, check_impl, check_kd_inputs, head_shape


def sparse_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    lse_t: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    variant: str = "tail",
    reduction: str = "mean",
    impl: str = "auto",
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Sparse top-k distillation loss of the student logits ``hidden @ weight.T`` (never materialised
    except by ``impl="eager"``) against teacher log-probs on up to k ids per row.

    ``variant``: "tail" (teacher tail mass kept as one outcome) or "renorm"; ``reduction``: "mean" over
    valid rows, "sum", or "none"; all T^2-scaled. ``divergence``: "forward_kl" KL(q || p), "reverse_kl"
    KL(p || q) or "jsd" (``beta`` KL(q || m) + (1 - ``beta``) KL(p || m), m = ``beta`` q + (1 - ``beta``) p),
    over the K ids plus the tail as one outcome (SPEC section 2b; reverse_kl and jsd need ``variant="tail"``).
    ``lse_t`` is the teacher's c_T (None: derived from the top-k, SPEC section 1). ``impl``: "auto" (Triton on
    CUDA, chunked on CPU), "eager", "chunked", "triton".
    Gradients flow to ``hidden``, and to ``weight`` only when it requires grad.

    Shape:
        hidden (N, H), weight (V, H), topk_ids (N, k) int32/int64 with -1 padding, topk_logprobs (N, k),
        lse_t (N,), mask (N,) bool -> () for mean/sum, (N,) for none; fp32 (fp64 if an input is fp64)
    """
    opts = KDOptions(
        temperature=float(temperature), variant=variant, reduction=reduction, divergence=divergence, beta=beta
    )
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    impl = check_impl(impl, hidden.device, hidden.dtype, *head_shape(hidden, weight))
    check_kd_inputs(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, finite=impl != "triton")
    if impl == "eager":
        from .reference import sparse_kd_eager

        return sparse_kd_eager(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts)
    from .streamed_kd import sparse_kd_streamed

    rows = "torch" if impl == "chunked" else "triton"
    return sparse_kd_streamed(hidden, weight, topk_ids, topk_logprobs, lse_t, mask, opts, rows)
