"""The loss's named choices and the rules between them, with no torch import: the kernels' options
(:mod:`ssb_kernels.options`) and the pipeline's config (``ssb.core.config_rules``) both check against this one
list, so a choice is defined once.
"""

from __future__ import annotations

IMPLS = ("auto", "eager", "chunked", "triton")
VARIANTS = ("tail", "renorm")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")


def loss_choice_problems(variant: str, divergence: str, beta: float) -> list[tuple[str, str]]:
    """``(option, what is wrong)`` for every broken rule of a loss's ``variant``, ``divergence`` and ``beta``."""
    problems = []
    if variant not in VARIANTS:
        problems.append(("variant", f"must be one of {VARIANTS}, got {variant!r}"))
    if divergence not in DIVERGENCES:
        problems.append(("divergence", f"must be one of {DIVERGENCES}, got {divergence!r}"))
    if variant == "renorm" and divergence != "forward_kl":
        problems.append(("variant", f"'renorm' is defined for forward_kl only, not {divergence!r}: use 'tail'"))
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
        problems.append(("beta", f"must be a float strictly between 0 and 1, got {beta!r}"))
    return problems
