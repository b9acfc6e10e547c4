"""The student side of a teacher store: each stored example paired with its student view, c_T at the training T.

The student sequence is the chat template of [system, bare question] (generation prompt included) followed by
the reply ids; the reply ids are recomputed from ``curate/student.jsonl`` and must equal the stored ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ssb.core.files import read_jsonl
from ssb.core.prompts import prompt_ids, reply_ids
from ssb.store.compat import StoreMismatchError, check_compatible
from ssb.store.format import StoreExample, TeacherStore

_warned: set[tuple[str, float]] = set()  # (store path, T): the approximation is announced once per store


@dataclass(frozen=True)
class DistillExample:
    """A student sequence and the teacher targets aligned to it.

    Hidden positions ``reply_start .. reply_start + R - 1`` of ``input_ids`` predict the R reply tokens.

    Shape:
        input_ids (P + R - 1,) long - student chat prompt (generation prompt included) + reply ids[:-1]
        token_ids (R,), topk_ids (R, k), topk_logprobs (R, k), lse_t (R,) float32 - c_T at the training T
        teacher_hidden (R, H) or None - a hidden store's teacher hidden states (then k = 0 and lse_t is unused)
    """

    example_index: int
    input_ids: torch.Tensor
    reply_start: int
    token_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    lse_t: torch.Tensor
    teacher_hidden: torch.Tensor | None = None


def lse_for(store: TeacherStore, temperature: float, example: StoreExample) -> torch.Tensor:
    """``c_T`` for ``example`` (R,) float32: exact when captured, else SPEC section 1's one-token-tail approximation
    (``ssb_kernels.derive_lse_t`` in float64, the one implementation of it), with a warning.

    ``ssb.config`` refuses a ``train.kd_temperature`` outside ``capture.temperatures`` unless
    ``train.approximate_c_t`` opts in; a vLLM-captured store holds T = 1 only and lands here for T != 1.
    """
    from ssb_kernels import derive_lse_t

    t = float(temperature)
    if example.hidden is not None:  # a hidden store: the loss forms c_T from the hidden states, nothing to look up
        return torch.zeros(example.rows, dtype=torch.float32)
    if t in example.lse:
        return example.lse[t]
    if (str(store.path), t) not in _warned:
        _warned.add((str(store.path), t))
        warnings.warn(
            f"{store.path}: c_T for T={t} was not captured (exact: {store.exact_temperatures}); "
            "approximating the teacher tail as one token (SPEC section 1)",
            stacklevel=2,
        )
    vocab = int(store.manifest["model"]["vocab_size"])
    return derive_lse_t(example.topk_ids, example.topk_logprobs.double(), t, vocab).float()


def build_student_examples(
    store: TeacherStore, student_jsonl: str | Path, tokenizer, temperature: float
) -> list[DistillExample]:
    """Pair every stored example with its student view (line ``example_index`` of ``student_jsonl``).

    The student prompt is the chat template of [system, bare question] with the generation prompt; the reply
    ids are recomputed and must equal the stored ones (else :class:`StoreMismatchError` naming the line).
    """
    check_compatible(store.manifest, tokenizer)
    records = read_jsonl(student_jsonl)
    out = []
    for i in range(len(store)):
        ex = store[i]
        line = ex.example_index + 1
        if ex.example_index >= len(records):
            raise StoreMismatchError(f"{student_jsonl}: has {len(records)} examples, store expects line {line}")
        msgs = records[ex.example_index].get("messages")
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise StoreMismatchError(f"{student_jsonl}:{line}: messages: expected [..., user, assistant]")
        p_ids = prompt_ids(tokenizer, msgs[:-1])
        r_ids = reply_ids(tokenizer, msgs[-1]["content"])
        if r_ids != ex.token_ids.tolist():
            raise StoreMismatchError(
                f"{student_jsonl}:{line}: the reply tokenises to {len(r_ids)} ids that differ from the "
                f"{ex.rows} stored ones (edited file or different tokenizer)"
            )
        input_ids = torch.tensor(p_ids + r_ids[:-1], dtype=torch.long)
        out.append(
            DistillExample(
                example_index=ex.example_index,
                input_ids=input_ids,
                reply_start=len(p_ids) - 1,
                token_ids=ex.token_ids,
                topk_ids=ex.topk_ids,
                topk_logprobs=ex.topk_logprobs,
                lse_t=lse_for(store, temperature, ex),
                teacher_hidden=ex.hidden,
            )
        )
    return out
