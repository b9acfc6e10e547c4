"""The vLLM capture backend: teacher top-k log-probs from ``prompt_logprobs``, exact at T = 1 only.

vLLM returns, for every prompt position, the k most likely tokens and the actual prompt token with their
full-vocabulary log-probs of the raw logits (``logprobs_mode="raw_logprobs"``). It cannot return
``c_T = LSE(l / T)`` for T != 1, so the manifest lists only T = 1 as exact and the trainer falls back to the
SPEC approximation for other temperatures. vLLM materialises (tokens, V) log-probs per scheduler step, so
``max_num_batched_tokens`` is kept small (``capture.vllm_max_num_batched_tokens``).
"""

from __future__ import annotations

import torch

from ssb.config import SSBConfig
from ssb.store import StoreExample


class VLLMCapture:
    """``vllm.LLM`` with ``max_logprobs`` raised to k; one ``generate`` of 1 token per shard of examples."""

    name = "vllm"
    exact_temperatures = [1.0]

    def __init__(self, cfg: SSBConfig, **llm_kwargs):
        # ssb.engines.make_engine takes no scheduler settings, so the LLM is built here with the same machine
        # settings as the generation engine (ssb.engines.vllm.build_llm) plus capture's own.
        from ssb.engines.vllm import build_llm

        self.llm = build_llm(
            cfg.model,
            cfg.engine,
            seed=cfg.seed,
            max_logprobs=cfg.capture.k,
            max_num_batched_tokens=cfg.capture.vllm_max_num_batched_tokens,
            enable_chunked_prefill=True,  # prompts longer than the token budget are prefilled in chunks
            logprobs_mode="raw_logprobs",  # log_softmax of the raw logits: T = 1, no processors
            **llm_kwargs,
        )
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())

    def close(self) -> None:
        """Free the engine (and its KV cache) so the process can go on or start another."""
        from ssb.engines.vllm import release_llm

        release_llm(self)

    def capture(self, items: list, k: int) -> list[StoreExample]:
        """Capture ``items`` (``ssb.capture.Item``); one StoreExample per item, same order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=it.prompt + it.reply) for it in items]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._example(it, out.prompt_logprobs, k) for it, out in zip(items, outs)]

    @staticmethod
    def _example(item, prompt_logprobs, k: int) -> StoreExample:
        R, P = len(item.reply), len(item.prompt)
        ids = torch.full((R, k), -1, dtype=torch.int32)
        lps = torch.full((R, k), float("-inf"), dtype=torch.float32)
        tok_lp = torch.empty(R, dtype=torch.float32)
        for r, tok in enumerate(item.reply):
            pos = prompt_logprobs[P + r]  # {token id: Logprob} for the token at prompt position P + r
            # the top-k plus the actual token (k + 1 entries when it falls outside the top-k)
            best = sorted(pos.items(), key=lambda kv: (-kv[1].logprob, kv[0]))[:k]
            ids[r, : len(best)] = torch.tensor([t for t, _ in best], dtype=torch.int32)
            lps[r, : len(best)] = torch.tensor([lp.logprob for _, lp in best], dtype=torch.float32)
            tok_lp[r] = pos[tok].logprob
        return StoreExample(
            example_index=item.example_index,
            token_ids=torch.tensor(item.reply, dtype=torch.int32),
            topk_ids=ids,
            topk_logprobs=lps,
            lse={},
            token_logprob=tok_lp,
        )
