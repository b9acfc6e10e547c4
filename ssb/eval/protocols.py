"""Named eval protocols: everything that decides what a score means, saved in full with every result.

A protocol fixes the system prompt, the user template, sampling, samples per problem, the grading mode and the
truncation rule, so two numbers are only compared when their protocols match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ssb.config import ConfigError, EvalConfig
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


def resolve_protocol(eval_cfg: EvalConfig, grading: str = "strict") -> Protocol:
    """The named preset with the config's explicit overrides (n, temperature, top_p, max_new_tokens) applied,
    graded in ``grading`` mode (``grading.mode``)."""
    if eval_cfg.protocol not in PROTOCOLS:
        known = sorted(PROTOCOLS)
        raise ConfigError(f"eval.protocol: unknown protocol {eval_cfg.protocol!r} (expected one of {known})")
    changes: dict[str, Any] = {"grading": grading}
    for key in ("n", "temperature", "top_p", "max_new_tokens"):
        if getattr(eval_cfg, key) is not None:
            changes[key] = getattr(eval_cfg, key)
    proto = dataclasses.replace(PROTOCOLS[eval_cfg.protocol], **changes)
    if proto.n < 1 or proto.max_new_tokens < 1:
        raise ConfigError(f"eval: n and max_new_tokens must be >= 1, got n={proto.n} max={proto.max_new_tokens}")
    if proto.temperature == 0 and proto.n > 1:
        raise ConfigError(
            f"eval.n: protocol {proto.name} is greedy (temperature 0), so n={proto.n} copies would fake pass@k; "
            "set eval.n=1 or an eval.temperature > 0"
        )
    return proto
