"""Prompts of the paper as editable templates, and the chat views of teacher and student.

Both views go through the tokenizer's own chat template (the reference code flattens the student prompt
to plain text; we do not). The reply always ends with the tokenizer's end-of-turn token so that stopping
is learned. Templates follow the SSB reference implementation
(https://github.com/purbeshmitra/semantic-soft-bootstrapping, logit_gen.py), reworded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ssb.core.files import sha256_text

SYSTEM_PROMPT = (
    "**Role:** You are an expert math tutor. When you are given a problem to solve, you provide detailed "
    "step-by-step reasoning in your solution. Your response is clear, precise, and unambiguous. You do not "
    "skip any step. You put your final answer within \\boxed{} at the end of your response."
)

HINTED_TEMPLATE = """Two students answered the math problem below. One response is correct and the other is incorrect. \
Both students were asked to put their final answer inside \\boxed{{}}; only that final answer was checked by an \
automatic grader. The problem:
---
{question}
---

The correct response of one student:
---
{correct}
---

An attempt by another student that the grader marked incorrect:
---
{incorrect}
---

Write a coherent, step-by-step derivation of the solution that does not skip any step and is as detailed as \
possible. It must be a standalone solution that students will study and learn from. Make it robust by warning \
about likely errors and wrong lines of reasoning. Do not mention, or even hint, that you were shown attempted \
responses by students.

End the whole response with the final answer in \\boxed{{}}, and make sure it exactly matches the boxed final \
answer of the correct response."""


SHORT_TEMPLATE = """{question}

A correct solution:
---
{correct}
---

Write your own step-by-step solution and end it with the final answer in \\boxed{{}}."""

# Phrases that give a kept reply away as written from the hinted view: it talks about the shown attempts, the
# students, the grader or the prompt's own wording instead of solving the problem. Matched case-insensitively at
# a word start ("attempt" also catches "attempts"), by ``leaked_phrase``; each template adds its own wording.
LEAKS_COMMON = ("student", "attempt", "grader", "graded", "response", "math problem", "the correct answer to the")
LEAKS = {
    "paper": (*LEAKS_COMMON, "marked incorrect", "were shown", "was shown", "robust"),
    "short": (*LEAKS_COMMON, "correct solution", "solution above", "given solution", "provided solution"),
    "multiturn": (
        *LEAKS_COMMON,
        "solve it again",
        "solving it again",
        "once again",
        "as before",
        "previous",
        "my earlier",
        "earlier solution",
        "earlier answer",
    ),
}


@dataclass(frozen=True)
class PromptSet:
    """The templates one run uses; hashed into manifests so stores and trainers can check they match.

    The teacher's view is the system prompt, then ``before`` (earlier turns, ``(role, format string)``), then
    ``hinted`` as the user turn the teacher answers; each format string may use ``{question}``, ``{correct}`` and
    ``{incorrect}``. ``leaks``: the phrases a robust solution written from this view must not contain."""

    system: str = SYSTEM_PROMPT
    hinted: str = HINTED_TEMPLATE
    name: str = "paper"
    before: tuple[tuple[str, str], ...] = ()
    leaks: tuple[str, ...] = LEAKS["paper"]

    def digest(self) -> str:
        turns = "".join(f"\x00{role}\x00{text}" for role, text in self.before)  # "" for one user turn: old digests
        return sha256_text(self.system + "\x00" + self.hinted + turns)[:16]


DEFAULT_PROMPTS = PromptSet()
# The hinted views ``curate.template`` names. paper: the SSB reference's prompt (both attempts, long instructions);
# short: the correct attempt only, one line of instruction; multiturn: the correct attempt as the model's own earlier
# answer, then a request to solve it again.
TEMPLATES: dict[str, PromptSet] = {
    "paper": DEFAULT_PROMPTS,
    "short": PromptSet(hinted=SHORT_TEMPLATE, name="short", leaks=LEAKS["short"]),
    "multiturn": PromptSet(
        hinted="Solve it again, step by step.",
        name="multiturn",
        before=(("user", "{question}"), ("assistant", "{correct}")),
        leaks=LEAKS["multiturn"],
    ),
}


def template(name: str) -> PromptSet:
    """The hinted view ``curate.template`` names (a ValueError lists the choices)."""
    if name not in TEMPLATES:
        raise ValueError(f"hinted template {name!r}: expected one of {'|'.join(TEMPLATES)}")
    return TEMPLATES[name]


def student_messages(question: str, prompts: PromptSet = DEFAULT_PROMPTS) -> list[dict]:
    """System + bare question: what the student (and every rollout) sees."""
    return [{"role": "system", "content": prompts.system}, {"role": "user", "content": question}]


def hinted_user_prompt(question: str, correct: str, incorrect: str, prompts: PromptSet = DEFAULT_PROMPTS) -> str:
    return prompts.hinted.format(question=question, correct=correct, incorrect=incorrect)


def teacher_messages(question: str, correct: str, incorrect: str, prompts: PromptSet = DEFAULT_PROMPTS) -> list[dict]:
    """System + the hinted view of ``prompts`` (question, a correct and a wrong rollout): what the teacher sees."""
    fill = {"question": question, "correct": correct, "incorrect": incorrect}
    earlier = [{"role": role, "content": text.format(**fill)} for role, text in prompts.before]
    return [
        {"role": "system", "content": prompts.system},
        *earlier,
        {"role": "user", "content": hinted_user_prompt(question, correct, incorrect, prompts)},
    ]


def leaked_phrase(reply: str, prompts: PromptSet = DEFAULT_PROMPTS) -> str | None:
    """The first of ``prompts.leaks`` that ``reply`` contains (case-insensitive, at a word start), or None."""
    low = reply.lower()
    for phrase in prompts.leaks:
        if re.search(r"(?<![a-z])" + re.escape(phrase), low):
            return phrase
    return None


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn (``<|im_end|>`` for ChatML/Qwen), falling back to EOS."""
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither an end-of-turn token nor an eos_token_id")
    return tokenizer.eos_token_id


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` through the chat template, with the generation prompt appended."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def reply_ids(tokenizer, reply: str) -> list[int]:
    """Token ids of an assistant reply, always ending with exactly one end-of-turn token.

    End-of-turn markers already at the end of ``reply`` (raw chat text such as ``...<|im_end|>\n``) are dropped
    before the one appended here; one inside the text is an error (the model would learn to stop mid-reply).
    """
    eot = end_of_turn_id(tokenizer)
    eot_text = tokenizer.convert_ids_to_tokens(eot)
    while reply.rstrip().endswith(eot_text):
        reply = reply.rstrip()[: -len(eot_text)]
    ids = list(tokenizer(reply, add_special_tokens=False)["input_ids"])
    if eot in ids:
        raise ValueError(f"reply contains the end-of-turn token {eot_text!r} before its end: {reply[:80]!r}...")
    return ids + [eot]


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat-templated string (for engines that take text)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
