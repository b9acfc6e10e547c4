"""The HF capture backend: base model -> final hidden states -> top-k log-probs streamed over the LM head.

``ssb_kernels.topk_logprobs`` never builds an (N, V) logits tensor and returns the exact ``c_T`` for every
requested temperature; sequences are batched by a token budget. With ``capture.store_format: hidden`` the rows'
final hidden states themselves are stored (``model.base_model``'s ``last_hidden_state``: after the final norm, the
head's input) with the reply token's log-prob, and the manifest gets the head's fingerprint (:mod:`ssb.store.hidden`).
"""

from __future__ import annotations

import torch

from ssb.capture.inputs import Item
from ssb.config import SSBConfig
from ssb.core.models import default_device, load_causal_lm
from ssb.store import StoreExample
from ssb.store.hidden import dtype_name, head_fingerprint


def pack_by_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Group indices (longest first) so each group's ``count * max_length`` stays within ``budget`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])  # a sequence longer than the budget runs alone
    return groups


class HFCapture:
    """Teacher forward with transformers: base model -> final hidden states -> streamed top-k over the LM head."""

    name = "hf"

    def __init__(self, cfg: SSBConfig, *, model=None):
        self.device = default_device()
        if model is None:
            model = load_causal_lm(cfg.model, self.device)
        self.model = model.to(self.device).eval()
        self.body = model.base_model  # the decoder stack incl. the final norm, without the LM head
        self.head = model.get_output_embeddings().weight  # (V, H); tied to the input embedding in Qwen2.5-3B
        self.vocab_size = int(self.head.shape[0])
        self.cap = cfg.capture
        self.temperatures = tuple(float(t) for t in cfg.capture.temperatures)
        self.exact_temperatures = sorted(set(self.temperatures) | {1.0})
        self.hidden = cfg.capture.store_format == "hidden"

    def hidden_info(self) -> dict:
        """What a hidden store's manifest records (``header["hidden"]``): dtype, H, V and the head's fingerprints."""
        return {"dtype": dtype_name(self.head.dtype), **head_fingerprint(self.model)}

    @torch.no_grad()
    def capture(self, items: list[Item], k: int) -> list[StoreExample]:
        """Capture ``items``; returns one StoreExample per item in the same order."""
        from ssb_kernels import topk_logprobs

        lengths = [len(it.prompt) + len(it.reply) - 1 for it in items]
        out: list[StoreExample | None] = [None] * len(items)
        temps = self.exact_temperatures
        for group in pack_by_budget(lengths, self.cap.token_budget):
            L = max(lengths[i] for i in group)
            ids = torch.zeros(len(group), L, dtype=torch.long)  # right padding: real positions are unaffected
            mask = torch.zeros(len(group), L, dtype=torch.long)
            for b, i in enumerate(group):
                seq = items[i].prompt + items[i].reply[:-1]
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
            hidden = self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            # rows predicting reply tokens: positions P-1 .. P+R-2 of each sequence -> (N, H)
            rows = torch.cat([hidden[b, len(items[i].prompt) - 1 : lengths[i]] for b, i in enumerate(group)])
            targets = torch.cat([torch.tensor(items[i].reply) for i in group]).to(self.device)
            if self.hidden:  # the hidden states are the targets; the top-1 only serves the reply token's log-prob
                top_ids, top_lp, lse = topk_logprobs(rows, self.head, 1, impl=self.cap.kernel_impl)
            else:  # ids (N, k) by descending log-prob, top_lp (N, k), lse (N, len(temps)): c_T per temperature
                top_ids, top_lp, lse = topk_logprobs(rows, self.head, k, temperatures=temps, impl=self.cap.kernel_impl)
            tok_lp = token_logprob(rows, self.head, targets, top_ids, top_lp)
            start = 0
            for i in group:
                a, b = start, start + len(items[i].reply)
                start = b
                if self.hidden:
                    out[i] = StoreExample(
                        example_index=items[i].example_index,
                        token_ids=targets[a:b].int().cpu(),
                        topk_ids=torch.zeros(b - a, 0, dtype=torch.int32),
                        topk_logprobs=torch.zeros(b - a, 0),
                        lse={},
                        token_logprob=tok_lp[a:b].cpu(),
                        hidden=rows[a:b].cpu(),  # (R, H) in the model's dtype
                    )
                    continue
                out[i] = StoreExample(
                    example_index=items[i].example_index,
                    token_ids=targets[a:b].int().cpu(),
                    topk_ids=top_ids[a:b].int().cpu(),
                    topk_logprobs=top_lp[a:b].float().cpu(),
                    lse={t: lse[a:b, c].float().cpu() for c, t in enumerate(temps) if t != 1.0},
                    token_logprob=tok_lp[a:b].cpu(),
                )
        return out  # type: ignore[return-value]


def token_logprob(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor
) -> torch.Tensor:
    """Full-vocab log-prob of each target token without full logits: ``z_t - LSE(z) = z_t - z_top1 + l_top1``.

    Shape: hidden (N, H), weight (V, H), targets (N,), top_ids (N, k), top_lp (N, k) -> (N,) float32
    """
    h = hidden.float()
    z_t = (h * weight[targets].float()).sum(-1)
    z_1 = (h * weight[top_ids[:, 0].long()].float()).sum(-1)
    lp = z_t - z_1 + top_lp[:, 0].float()
    hit = top_ids.long() == targets.long().unsqueeze(-1)  # inside the top-k: take the kernel's value verbatim
    return torch.where(hit.any(-1), (top_lp.float() * hit).sum(-1), lp)
