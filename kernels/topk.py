"""Public teacher-capture op: streaming top-k full-vocabulary log-probs and c_T per temperature."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .options import TopkOptions, check_head, check_impl


def topk_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    temperatures: Sequence[float] = (1.0,),
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the k largest log-probs of ``softmax(hidden @ weight.T)`` (T = 1, full vocabulary), their
    ids sorted by descending value, and c_T = LSE_v(l_v / T) for each requested temperature (SPEC section 1).

    Streams over the vocabulary (except ``impl="eager"``): no (N, V) tensor. No gradients.

    Shape:
        hidden (N, H), weight (V, H) -> ids (N, k) int64, logprobs (N, k) fp32, lse_t (N, len(temperatures)) fp32
    """
    opts = TopkOptions(k=k, temperatures=tuple(float(t) for t in temperatures))
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    impl = check_impl(impl, hidden.device, hidden.dtype)
    check_head(hidden, weight, finite=impl != "triton")
    if k > weight.shape[0]:
        raise ValueError(f"k must be <= V={weight.shape[0]}, got {k}")
    if impl == "eager":
        from .reference import topk_logprobs_eager

        return topk_logprobs_eager(hidden, weight, opts)
    if impl == "chunked":
        from .topk_stream import topk_logprobs_chunked

        return topk_logprobs_chunked(hidden, weight, opts)
    from .triton_topk import topk_logprobs_triton

    return topk_logprobs_triton(hidden, weight, opts)
