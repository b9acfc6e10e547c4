"""``ssb rollout``: K graded samples per problem. Also the public home of the generation engines.

The engines live in :mod:`ssb.engines` (vLLM in ``engines_vllm``, HF in ``engines_hf``) and are re-exported here.
"""

from __future__ import annotations

from ssb.engines import Completion, Engine, Sampling, derive_seed, make_engine

__all__ = ["Completion", "Engine", "Sampling", "derive_seed", "make_engine"]
