"""The hidden store format (``capture.store_format: hidden``, docs/SPEC.md section 5b): the exact teacher.

In SSB the teacher (base model, hinted prompt) and the student (base + LoRA, bare prompt) share the frozen LM head
``W`` (V, H). The teacher's final hidden state ``h_T`` (after the final norm, the input to the head) therefore fixes
its whole distribution, ``softmax(W h_T / T)`` at every temperature, in H values per row instead of a top-k. A
hidden store keeps ``h_T`` in the model's dtype (H x 2 bytes in bf16) plus the reply token id and its log-prob, and
the manifest names the head it is exact for: the sha256 of the head (and of the final norm) the capture used.

This module holds what the capture, the trainer and ``ssb capture --inspect`` share: those fingerprints, the check
that a student's head is the one a store was captured with, and top-k teacher mass at a temperature computed from
hidden states, streamed over the vocabulary (``ssb_kernels.topk_logprobs``: never an (N, V) tensor).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from ssb.store.compat import StoreMismatchError
from ssb.store.format import VALUE_DTYPES as HIDDEN_DTYPES

_HASH_ELEMENTS = 1 << 22  # elements hashed per chunk (16 MB in fp32): a 150k x 2048 head never doubles in memory


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; only the float dtypes a store may hold."""
    for name, dt in HIDDEN_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"hidden states must be float32, bfloat16 or float16, got {dtype}")


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' values widened to float32 (exact for bf16/fp16), with their shapes, row chunk by row
    chunk. A bf16 head and its fp32 upcast hash alike (they give the same logits); a head rounded to bf16 does not."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        h.update(repr(tuple(t.shape)).encode())
        flat = t.reshape(-1) if t.dim() else t.reshape(1)
        for i in range(0, flat.numel(), _HASH_ELEMENTS):
            h.update(flat[i : i + _HASH_ELEMENTS].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def final_norm(model: nn.Module) -> nn.Module | None:
    """The decoder's final norm (``model.model.norm`` for Llama, Qwen2/3, Mistral), or None when it has none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return getattr(decoder, "norm", None) if decoder is not None else None


def head_problem(model: nn.Module, *, training: bool = False) -> str | None:
    """Why ``model``'s LM head is not a plain float matrix the teacher's hidden states are exact for, or None:
    a PEFT wrapper on it (LoRA on ``lm_head`` or ``modules_to_save``), a quantised weight, or (``training``: the
    student's head must stay frozen) a trainable one."""
    head = model.get_output_embeddings()
    if type(head).__module__.startswith("peft"):
        return f"the LM head is wrapped by PEFT ({type(head).__name__}: a LoRA target or in modules_to_save)"
    w = head.weight
    if training and w.requires_grad:
        return "the LM head is trainable"
    if not w.is_floating_point() or w.dtype not in HIDDEN_DTYPES.values():
        return f"the LM head is quantised ({type(w).__name__} {w.dtype})"
    return None


def head_fingerprint(model: nn.Module) -> dict:
    """What a hidden store records of the model it was captured with (and a student must match): the head's and the
    final norm's sha256 (:func:`tensor_sha256`), H and V. ``model`` is a causal LM (or its PEFT base model)."""
    problem = head_problem(model)
    if problem is not None:
        raise StoreMismatchError(f"cannot fingerprint the LM head: {problem}")
    w = model.get_output_embeddings().weight
    norm = final_norm(model)
    norm_params = [p for _, p in sorted(norm.named_parameters())] if norm is not None else []
    return {
        "size": int(w.shape[1]),
        "vocab_size": int(w.shape[0]),
        "head_sha256": tensor_sha256(w),
        "norm_sha256": tensor_sha256(*norm_params) if norm_params else None,
    }


def check_head(manifest: dict, model: nn.Module) -> None:
    """Refuse (:class:`StoreMismatchError`, one line) a hidden store whose head is not ``model``'s frozen head: its
    teacher hidden states would give another distribution than the one they were captured from."""
    where = f"{manifest.get('path', 'teacher store')}/manifest.json"
    want = manifest["hidden"]
    problem = head_problem(model, training=True)
    if problem is not None:
        raise StoreMismatchError(
            f"{where}: a hidden store needs the student's frozen LM head as captured, but "
            f"{problem}; train on the plain float head (or capture a sparse store)"
        )
    got = head_fingerprint(model)
    for key, what in (("size", "hidden size"), ("vocab_size", "vocabulary"), ("head_sha256", "LM head sha256")):
        if got[key] != want[key]:
            raise StoreMismatchError(
                f"{where}: {what} {str(want[key])[:16]} of the captured teacher != {str(got[key])[:16]} of the student "
                f"({manifest['model']['id']} vs the trainer's model): the hidden states are exact for the captured "
                "head only; recapture with the student's base model"
            )


def topk_mass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ks: Sequence[int],
    temperatures: Sequence[float],
    *,
    rows_per_chunk: int = 1024,
    impl: str = "auto",
) -> dict[float, dict[int, torch.Tensor]]:
    """Per row, the teacher mass of its k most likely tokens at each temperature T, for each k in ``ks``:
    ``sum_{j<k} exp(l_j / T - c_T)`` from ``ssb_kernels.topk_logprobs`` (log-probs at T = 1 and exact ``c_T``),
    ``rows_per_chunk`` rows at a time. The top-k set is the same at every T (tempering keeps the logits' order).

    Shape: hidden (N, H), weight (V, H) -> {T: {k: (N,) float64}}
    """
    from ssb_kernels import topk_logprobs

    kmax = min(max(ks), int(weight.shape[0]))
    temps = [float(t) for t in temperatures]
    out: dict[float, dict[int, list[torch.Tensor]]] = {t: {k: [] for k in ks} for t in temps}
    with torch.no_grad():
        for a in range(0, hidden.shape[0], rows_per_chunk):
            h = hidden[a : a + rows_per_chunk].to(weight.device, weight.dtype)
            _, lp, lse = topk_logprobs(h, weight, kmax, temperatures=temps, impl=impl)
            for c, t in enumerate(temps):
                cum = torch.exp(lp.double() / t - lse.double()[:, c : c + 1]).cumsum(-1)  # (n, kmax)
                for k in ks:
                    out[t][k].append(cum[:, min(k, kmax) - 1])
    empty = torch.zeros(0, dtype=torch.float64)
    return {t: {k: torch.cat(v) if v else empty for k, v in per_k.items()} for t, per_k in out.items()}
