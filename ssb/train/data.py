"""Training data for ``ssb train``: a deterministic example stream, per-rank micro-batches, packing.

The stream is the concatenation of seeded per-epoch permutations of the examples, so optimizer step ``s``
always consumes stream items ``[s*G, (s+1)*G)`` with ``G`` the global batch (examples per step over all ranks).
The data position of a checkpoint is therefore just the step number, and no example is ever dropped: a last
partial epoch is filled from the next epoch's permutation.

A micro-batch is packed into one row with per-example position ids (transformers then builds a
block-diagonal causal mask for sdpa/eager and uses varlen kernels for flash-attention) or padded to
``(B, L_max)`` with an attention mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class Example(Protocol):
    """What the trainer reads from an ``ssb.store.DistillExample`` (student view + teacher targets).

    Shape:
        input_ids (P+R-1,) long: student prompt with generation prompt + reply ids[:-1]
        token_ids (R,), topk_ids (R, k), topk_logprobs (R, k), lse_t (R,)
        hidden positions reply_start .. reply_start+R-1 predict the R reply tokens.
    """

    input_ids: torch.Tensor
    reply_start: int
    token_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    lse_t: torch.Tensor


@dataclass
class Batch:
    """One micro-batch, ready for the model and the loss.

    Shape:
        input_ids, position_ids (B, L) long; attention_mask (B, L) long or None (packed rows)
        rows (N,) long: flat indices into the (B*L) hidden states of the N distilled positions
        token_ids (N,) long; topk_ids (N, k) long; topk_logprobs (N, k) float32; lse_t (N,) float32
        reply_lens (E,) long: reply length of each of the E examples
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    rows: torch.Tensor
    token_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    lse_t: torch.Tensor
    reply_lens: torch.Tensor

    @property
    def n_rows(self) -> int:
        return int(self.rows.numel())

    @property
    def n_input_tokens(self) -> int:
        if self.attention_mask is None:
            return int(self.input_ids.numel())
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        move = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()
        }
        return Batch(**move)


def check_examples(examples: Sequence[Example]) -> None:
    """Validate alignment of every example; errors name the example index and the field."""
    if not examples:
        raise ValueError("no training examples (is RUN_DIR/capture empty?)")
    k = examples[0].topk_ids.shape[-1]
    for i, ex in enumerate(examples):
        r = int(ex.token_ids.numel())
        if ex.input_ids.dim() != 1 or r < 1:
            raise ValueError(f"example {i}: input_ids must be 1-D and the reply non-empty")
        if ex.reply_start < 0 or ex.reply_start + r != ex.input_ids.numel():
            raise ValueError(
                f"example {i}: reply_start + R must equal len(input_ids) "
                f"(got {ex.reply_start} + {r} vs {ex.input_ids.numel()})"
            )
        for name in ("topk_ids", "topk_logprobs"):
            t = getattr(ex, name)
            if tuple(t.shape) != (r, k):
                raise ValueError(f"example {i}: {name} has shape {tuple(t.shape)}, expected ({r}, {k})")
        if tuple(ex.lse_t.shape) != (r,):
            raise ValueError(f"example {i}: lse_t has shape {tuple(ex.lse_t.shape)}, expected ({r},)")


def steps_for(n_examples: int, epochs: int, global_batch: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: ``ceil(epochs * n / G)`` unless ``max_steps`` is set."""
    if max_steps is not None:
        return max_steps
    return math.ceil(epochs * n_examples / global_batch)


def stream_indices(n_examples: int, start: int, count: int, seed: int) -> list[int]:
    """Items ``[start, start+count)`` of the infinite stream of seeded epoch permutations of ``range(n)``."""
    out: list[int] = []
    perms: dict[int, list[int]] = {}
    for i in range(start, start + count):
        epoch = i // n_examples
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perms[epoch] = torch.randperm(n_examples, generator=gen).tolist()
        out.append(perms[epoch][i % n_examples])
    return out


def rank_micro_batches(
    indices: list[int],
    lengths: Sequence[int],
    *,
    rank: int,
    world: int,
    batch_size: int,
    token_budget: int = 0,
) -> list[list[int]]:
    """Split one step's global example indices into this rank's micro-batches.

    Rank ``r`` takes the r-th contiguous slice of ``indices``; the slice is cut into micro-batches of
    ``batch_size`` examples, or, with ``token_budget > 0``, greedily into micro-batches of at most
    ``token_budget`` input tokens (an example longer than the budget gets a micro-batch of its own).
    """
    if len(indices) % world:
        raise ValueError(f"global batch {len(indices)} is not divisible by world size {world}")
    per_rank = len(indices) // world
    mine = indices[rank * per_rank : (rank + 1) * per_rank]
    if token_budget <= 0:
        return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in mine:
        if cur and used + lengths[i] > token_budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    if cur:
        out.append(cur)
    return out


def collate(examples: Sequence[Example], *, packing: bool, pad_id: int = 0) -> Batch:
    """Pack (one row, per-example position ids, no mask) or right-pad ``examples`` into a :class:`Batch`."""
    lens = [int(ex.input_ids.numel()) for ex in examples]
    if packing:
        input_ids = torch.cat([ex.input_ids.long() for ex in examples])[None]
        position_ids = torch.cat([torch.arange(n) for n in lens])[None]
        attention_mask = None
        offsets = [sum(lens[:i]) for i in range(len(lens))]
        width = sum(lens)
    else:
        width = max(lens)
        input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for b, ex in enumerate(examples):
            input_ids[b, : lens[b]] = ex.input_ids
            attention_mask[b, : lens[b]] = 1
        position_ids = torch.arange(width).expand(len(examples), width).clone()
        offsets = [b * width for b in range(len(examples))]
    # hidden position reply_start + j (j < R) predicts reply token j
    rows = torch.cat(
        [torch.arange(ex.token_ids.numel()) + off + ex.reply_start for ex, off in zip(examples, offsets, strict=True)]
    )
    return Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        rows=rows,
        token_ids=torch.cat([ex.token_ids.long() for ex in examples]),
        topk_ids=torch.cat([ex.topk_ids.long() for ex in examples]),
        topk_logprobs=torch.cat([ex.topk_logprobs.float() for ex in examples]),
        lse_t=torch.cat([ex.lse_t.float() for ex in examples]),
        reply_lens=torch.tensor([int(ex.token_ids.numel()) for ex in examples]),
    )


def teacher_topk_mass(batch: Batch) -> torch.Tensor:
    """Teacher probability mass (T = 1) inside the stored top-k, summed over rows. Shape: scalar float64."""
    valid = batch.topk_ids >= 0
    return (batch.topk_logprobs.double().exp() * valid).sum()
