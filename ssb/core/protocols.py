"""The named eval protocols' presets: everything that decides what a score means (the eval stage applies a
config's overrides to them, ``ssb.eval.protocols``; the config's ``eval.protocol`` choices are their names).
"""

from __future__ import annotations

from dataclasses import dataclass

from ssb.core.prompts import SYSTEM_PROMPT

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Protocol:
    """Everything that decides what a score means; saved in full with every result."""

    name: str
    system: str | None  # None: no system message
    user_template: str  # "{question}" is replaced by the question (plain replace: LaTeX braces stay as they are)
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    n: int  # samples per problem
    max_new_tokens: int
    source: str  # where the preset comes from
    grading: str = "strict"  # grading.mode: how the final answer is found (ssb.core.grading.grade)
    # A reply cut at max_new_tokens is wrong, as in rollout and curation: it never committed to a final answer,
    # and it does not vote in maj@k. Aggregates still count the truncated replies whose last box was right.
    truncated: str = "wrong"

    def messages(self, question: str) -> list[dict]:
        user = {"role": "user", "content": self.user_template.replace("{question}", question)}
        return ([{"role": "system", "content": self.system}] if self.system is not None else []) + [user]


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "ssb-paper", SYSTEM_PROMPT, "{question}", 0.8, 1.0, 50, 1, 8192,
            "SSB tutor system prompt (ssb.core.prompts) + bare question, boxed answer; sampling of the reference "
            "code's inference (github.com/purbeshmitra/semantic-soft-bootstrapping logit_gen.py: T=0.8, "
            "top_k=50, 8192)",
        ),
        Protocol(
            "qwen-math", BOXED_INSTRUCTION, "{question}", 0.0, 1.0, 0, 1, 2048,
            "Qwen2.5-Math evaluation chat prompt (system = boxed CoT instruction), greedy, 2048 new tokens",
        ),
        Protocol(
            "r1", None, "{question}\n" + BOXED_INSTRUCTION, 0.6, 0.95, 0, 8, 8192,
            "DeepSeek-R1 recommendation (arXiv 2501.12948): no system prompt, instruction in the user turn, "
            "T=0.6, top_p=0.95, pass@1 averaged over n samples; 8192 new tokens here (R1 used 32768)",
        ),
    )
}  # fmt: skip
