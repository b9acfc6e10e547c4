"""Named eval protocols: everything that decides what a score means, saved in full with every result.

A protocol fixes the system prompt, the user template, sampling, samples per problem, the grading mode and the
truncation rule, so two numbers are only compared when their protocols match.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ssb.config import ConfigError, EvalConfig
from ssb.core.protocols import BOXED_INSTRUCTION, PROTOCOLS, Protocol

__all__ = ["BOXED_INSTRUCTION", "PROTOCOLS", "Protocol", "resolve_protocol"]


def resolve_protocol(eval_cfg: EvalConfig, grading: str = "strict") -> Protocol:
    """The named preset with the config's explicit overrides (n, temperature, top_p, max_new_tokens) applied,
    graded in ``grading`` mode (``grading.mode``)."""
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
