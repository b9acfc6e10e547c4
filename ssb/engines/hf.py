"""The Hugging Face engine: batched ``generate`` with left padding and per-sample seeded sampling.

``generate`` itself draws from the global RNG, which makes a sample depend on its batch. Instead a logits
processor samples every row with that row's own ``torch.Generator`` (temperature, top-k, top-p as vLLM
applies them) and leaves one finite logit, so greedy decoding inside ``generate`` emits exactly that token.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ssb.config import EngineConfig, ModelConfig
from ssb.core.models import default_device, load_causal_lm, load_tokenizer
from ssb.core.prompts import end_of_turn_id, prompt_ids
from ssb.engines.types import BatchProgress, Completion, Sampling, sample_seeds, split_at_stop


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) masking; masked entries become -inf.

    Shape: logits (B, V) -> (B, V) float32.
    """
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class StepProgress:
    """A stopping criterion that never stops anything: it reports each decode step to a :class:`BatchProgress`
    (sequences still generating, sequences that just emitted their stop token)."""

    def __init__(self, progress: BatchProgress, stop_ids: set[int], rows: int) -> None:
        self.progress = progress
        self.stop = torch.tensor(sorted(stop_ids))
        self.done = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1].cpu()  # (B,) the token this step generated
        now = ~self.done & torch.isin(last, self.stop)
        self.progress.step(int((~self.done).sum()), finished=int(now.sum()))
        self.done |= now
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class RowSampler:
    """Logits processor: sample row r with ``generators[r]``; return logits with only that token finite."""

    def __init__(self, generators: list[torch.Generator], sampling: Sampling) -> None:
        self.generators = generators
        self.sampling = sampling

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        if s.temperature == 0:
            chosen = scores.argmax(-1, keepdim=True)  # (B, 1)
        else:
            probs = filter_logits(scores, s.temperature, s.top_k, s.top_p).softmax(-1)  # (B, V)
            chosen = torch.stack([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen.to(scores.device), 0.0)


class HFEngine:
    """A transformers model (plus optional PEFT adapters) generating chat replies in left-padded batches."""

    backend = "hf"

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, *, adapter: str | Path | None = None):
        self.tokenizer = load_tokenizer(model_cfg)
        self.tokenizer.padding_side = "left"
        device = default_device()
        self.model = load_causal_lm(model_cfg, device, device_map="cuda" if device.type == "cuda" else None).eval()
        self.batch_size = engine_cfg.batch_size
        self.max_model_len = engine_cfg.max_model_len
        self.stop_ids = {end_of_turn_id(self.tokenizer)}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else end_of_turn_id(self.tokenizer)
        self.adapter = str(adapter) if adapter is not None else None
        self._adapters: dict[str, str] = {}  # path -> PEFT adapter name

    def _activate(self, lora: str | Path | None) -> bool:
        """Load/select the adapter for this call; False means run the base model."""
        path = str(lora) if lora is not None else self.adapter
        if path is None:
            return False
        if path not in self._adapters:
            from peft import PeftModel

            name = f"a{len(self._adapters)}"
            if not self._adapters:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
            self._adapters[path] = name
        self.model.set_adapter(self._adapters[path])
        return True

    @torch.inference_mode()
    def generate(
        self,
        conversations: list[list[dict]],
        sampling: Sampling,
        *,
        lora: str | Path | None = None,
        seed_keys: list[str] | None = None,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        """Sample ``sampling.n`` replies per conversation. Returns ``out[i][j]`` = sample j of conversation i."""
        if not conversations:
            return []
        seeds = sample_seeds(sampling, len(conversations), seed_keys)
        use_adapter = self._activate(lora)
        flat: list[Completion] = []
        progress = BatchProgress(desc, len(conversations) * sampling.n, sampling.max_new_tokens, exact=True)
        try:
            for start in range(0, len(conversations), self.batch_size):
                convs = conversations[start : start + self.batch_size]
                rows = [(conv, seed) for conv, conv_seeds in zip(convs, seeds[start:]) for seed in conv_seeds]
                if use_adapter or not self._adapters:
                    flat.extend(self._generate_rows(rows, sampling, progress))
                else:
                    with self.model.disable_adapter():
                        flat.extend(self._generate_rows(rows, sampling, progress))
        finally:
            progress.close()
        return [flat[i * sampling.n : (i + 1) * sampling.n] for i in range(len(conversations))]

    def _generate_rows(
        self, rows: list[tuple[list[dict], int]], sampling: Sampling, progress: BatchProgress
    ) -> list[Completion]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        prompts = [prompt_ids(self.tokenizer, conv) for conv, _ in rows]
        width = max(map(len, prompts))
        max_new = sampling.max_new_tokens
        if self.max_model_len is not None:
            max_new = min(max_new, self.max_model_len - width)
            if max_new < 1:
                raise ValueError(f"prompt of {width} tokens leaves no room under engine.max_model_len")
        device = self.model.device
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, P) left-padded
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(prompts):
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
        gens = [torch.Generator(device=device).manual_seed(seed) for _, seed in rows]
        steps = StepProgress(progress, self.stop_ids, len(rows))
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=False,  # RowSampler did the sampling; greedy just takes its one finite token
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.pad_id,
        )
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([RowSampler(gens, sampling)]),
            stopping_criteria=StoppingCriteriaList([steps]),
        )  # (B, P + new)
        progress.finished(int((~steps.done).sum()))  # rows that ran to max_new_tokens end with the call
        result = []
        for r in range(len(rows)):
            ids, reason = split_at_stop(out[r, width:].tolist(), self.stop_ids)
            if reason == "stop":
                text_ids = ids[:-1]
            else:
                text_ids = ids
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            result.append(Completion(text=text, token_ids=tuple(ids), finish_reason=reason))
        return result

    def close(self) -> None:
        self.model = None
        gc.collect()
