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
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Example(Protocol):
    """What the trainer reads from an ``ssb.store.DistillExample`` (student view + teacher targets).

    Shape:
        input_ids (P+R-1,) long: student prompt with generation prompt + reply ids[:-1]
        token_ids (R,), topk_ids (R, k), topk_logprobs (R, k), lse_t (R,)
        hidden positions reply_start .. reply_start+R-1 predict the R reply tokens.
        A hidden store's examples also have ``teacher_hidden`` (R, H) (and k = 0); others may lack the attribute.
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
        teacher_hidden (N, H) in the store's dtype, or None: a hidden store's exact teacher (then k = 0)
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
    teacher_hidden: torch.Tensor | None = None

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
    hidden = teacher_hidden(examples[0]) is not None
    for i, ex in enumerate(examples):
        th = teacher_hidden(ex)
        if (th is not None) != hidden:
            raise ValueError(f"example {i}: hidden-store and sparse-store examples cannot train together")
        if th is not None and (th.dim() != 2 or th.shape[0] != int(ex.token_ids.numel())):
            raise ValueError(f"example {i}: teacher_hidden has shape {tuple(th.shape)}, expected (R, H)")
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


def teacher_hidden(ex: Example) -> torch.Tensor | None:
    """A hidden store's teacher hidden states (R, H) of ``ex``, else None."""
    return getattr(ex, "teacher_hidden", None)


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
    hidden = [teacher_hidden(ex) for ex in examples]
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
        teacher_hidden=torch.cat(hidden) if hidden[0] is not None else None,
    )


def teacher_topk_mass(batch: Batch, temperature: float) -> torch.Tensor:
    """Teacher probability mass inside the stored top-k, summed over rows, at T = 1 (``c_1 = 0``) or at the training
    T, whose ``c_T`` the batch carries (``lse_t``): ``sum_K exp(l_j / T - c_T)``. Exact when the store captured that
    ``c_T``; else the one-token tail's, an upper bound for T > 1 (the loop names it ``teacher_topk_mass_approx``).
    Sparse batches only (a hidden store's mass comes from its hidden states: ``ssb.store.hidden.topk_mass``).

    Shape: scalar float64
    """
    valid = batch.topk_ids >= 0
    c = batch.lse_t.double()[:, None] if float(temperature) != 1.0 else 0.0
    return (torch.exp(batch.topk_logprobs.double() / float(temperature) - c) * valid).sum()


@dataclass
class TeacherMass:
    """How the loop reports the teacher's top-``k`` mass at the training temperature (``metrics.jsonl``).

    Sparse stores: the stored top-k's mass, exact from the stored log-probs and ``c_T``, named
    ``teacher_topk_mass_approx`` when some store lacks the exact ``c_T`` at T (its one-token tail makes the figure
    an upper bound for T > 1). Hidden stores: the exact top-``k`` mass (``k = capture.k``) from the teacher's hidden
    states through the head, computed once per example and cached (``ssb.store.hidden.topk_mass``).
    """

    k: int
    key: str = "teacher_topk_mass"
    cache: dict[int, tuple[float, float]] = field(default_factory=dict)  # hidden: example -> (at T, at T = 1)

    def sums(self, batch: Batch, indices: list[int], weight: torch.Tensor, temperature: float) -> list:
        """(mass at T, mass at T = 1) summed over the batch's rows (float64 tensors or floats)."""
        if batch.teacher_hidden is None:
            return [teacher_topk_mass(batch, temperature), teacher_topk_mass(batch, 1.0)]
        if any(i not in self.cache for i in indices):
            from ssb.store.hidden import topk_mass

            m = topk_mass(batch.teacher_hidden, weight, [self.k], sorted({float(temperature), 1.0}))
            at_t, at_1 = m[float(temperature)][self.k], m[1.0][self.k]
            ends = batch.reply_lens.cumsum(0).tolist()
            for i, a, b in zip(indices, [0, *ends[:-1]], ends):
                self.cache[i] = (float(at_t[a:b].sum()), float(at_1[a:b].sum()))
        return [sum(self.cache[i][0] for i in indices), sum(self.cache[i][1] for i in indices)]


def teacher_mass_for(examples: Sequence[Example], stores: list, temperature: float, hidden_k: int) -> TeacherMass:
    """What :class:`TeacherMass` reports for ``examples`` from ``stores`` (none: examples given directly, their
    ``c_T`` taken as exact); ``hidden_k``: the k of a hidden store's figure (``capture.k``)."""
    if teacher_hidden(examples[0]) is not None:
        return TeacherMass(k=hidden_k)
    t = float(temperature)
    approx = any(t not in store.exact_temperatures for store in stores)
    key = "teacher_topk_mass_approx" if approx else "teacher_topk_mass"
    return TeacherMass(k=int(examples[0].topk_ids.shape[-1]), key=key)
