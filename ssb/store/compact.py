"""The compact store format (``capture.store_format: compact``): bit-packed ids and companded 1-byte-scale values.

Per row, against the exact format's ``k * (4 + 4)`` bytes of ids and fp32 log-probs:

- ids: each of the k ids in ``id_bits = ceil(log2(V + 1))`` bits (code V is -1 padding), bit-packed;
- log-probs: the row's top log-prob ``l_0`` and the gap ``D = l_0 - l_min`` kept in fp32, and every entry's gap
  ``d_j = l_0 - l_j`` in ``code_bits = clamp(28 - id_bits, 8, 16)`` bits, companded so the quantiser is fine
  where the teacher's probability is high: ``u = (1 - e^{-d/3}) / (1 - e^{-D/3})``, rounded to a grid of
  ``2^code_bits - 1`` steps. Minimising the q-weighted squared error of the gaps sum_j q_j delta_j^2 with
  ``q_j ~ e^{-d_j}`` puts quantiser points at density ``~ (e^{-d})^{1/3}`` (Panter-Dite), hence the ``/3``. The
  top entry decodes exactly; at d ~ 0 the step is ``3 / 2^code_bits`` nats (0.003 at 10 bits);
- exact as before: ``c_T`` per stored temperature, the realised token's id and log-prob (fp32).

So ids and values take at most 28 bits, 3.5 bytes, per entry, plus 4 (token id) + 4 (token log-prob) + 8 (l_0,
D) + 4 per stored c_T bytes per row: 248 bytes at k = 64 with one stored c_T (T = 2), against 524 exact.
"""

from __future__ import annotations

import math

import torch

ROW_BITS = 28  # id_bits + code_bits per entry: the 3.5 bytes/entry budget
NAMES = ("topk_ids_packed", "topk_codes_packed", "row_top", "row_gap")  # the tensors replacing topk_ids/logprobs


def id_bits(vocab_size: int) -> int:
    return max(1, math.ceil(math.log2(vocab_size + 1)))  # codes 0..V-1 and V for padding


def code_bits(vocab_size: int) -> int:
    return min(16, max(8, ROW_BITS - id_bits(vocab_size)))


def layout(vocab_size: int) -> dict:
    """What the manifest records of the packing (readers recompute it from the vocabulary size)."""
    return {"id_bits": id_bits(vocab_size), "code_bits": code_bits(vocab_size), "companding": "1-exp(-d/3)"}


def shapes(k: int, vocab_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-row shape tail and dtype of each compact tensor."""
    nb = lambda bits: (math.ceil(k * bits / 8),)  # noqa: E731
    return {
        "topk_ids_packed": (nb(id_bits(vocab_size)), torch.uint8),
        "topk_codes_packed": (nb(code_bits(vocab_size)), torch.uint8),
        "row_top": ((), torch.float32),
        "row_gap": ((), torch.float32),
    }


def pack_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, k) non-negative ints < 2^bits -> (R, ceil(k * bits / 8)) uint8, little-endian bit order per row."""
    r, k = x.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    b = ((x.to(torch.int64)[..., None] >> shifts) & 1).to(torch.uint8).reshape(r, k * bits)  # (R, k * bits)
    pad = (-b.shape[1]) % 8
    b = torch.cat([b, b.new_zeros(r, pad)], 1).reshape(r, -1, 8)
    return (b.to(torch.int64) << torch.arange(8, dtype=torch.int64)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (R, nbytes) uint8 -> (R, k) int64."""
    r = packed.shape[0]
    b = (packed.to(torch.int64)[..., None] >> torch.arange(8, dtype=torch.int64)) & 1  # (R, nbytes, 8)
    b = b.reshape(r, -1)[:, : k * bits].reshape(r, k, bits)
    return (b << torch.arange(bits, dtype=torch.int64)).sum(-1)


def encode(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """(R, k) ids (-1 padding) and log-probs sorted descending -> the compact tensors of those rows."""
    ib, cb = id_bits(vocab_size), code_bits(vocab_size)
    valid = topk_ids >= 0
    l = topk_logprobs.double().masked_fill(~valid, float("nan"))
    top = l[:, :1].nan_to_num(0.0)  # sorted: entry 0 is the largest (a row of padding only: 0)
    d = (top - l).clamp(min=0.0)  # (R, k) gaps, NaN on padding
    gap = d.nan_to_num(0.0).amax(1, keepdim=True)  # D per row
    denom = -torch.expm1(-gap / 3)  # 1 - e^{-D/3}; 0 when every entry ties the top
    u = torch.where(denom > 0, -torch.expm1(-d / 3) / denom.clamp(min=1e-300), 0.0)
    levels = (1 << cb) - 1
    codes = torch.where(valid, (u * levels).round().clamp(0, levels), 0.0).to(torch.int64)
    ids = torch.where(valid, topk_ids.to(torch.int64), vocab_size)
    return {
        "topk_ids_packed": pack_bits(ids, ib),
        "topk_codes_packed": pack_bits(codes, cb),
        "row_top": top[:, 0].float(),
        "row_gap": gap[:, 0].float(),
    }


def decode(t: dict[str, torch.Tensor], k: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the compact tensors -> (R, k) int32 ids (-1 padding) and fp32 log-probs (0 under padding)."""
    ib, cb = id_bits(vocab_size), code_bits(vocab_size)
    ids = unpack_bits(t["topk_ids_packed"], ib, k)
    codes = unpack_bits(t["topk_codes_packed"], cb, k).double() / ((1 << cb) - 1)
    top, gap = t["row_top"].double()[:, None], t["row_gap"].double()[:, None]
    denom = -torch.expm1(-gap / 3)
    d = -3 * torch.log1p(-codes * denom)  # inverse companding; code 0 is the top entry exactly
    valid = ids < vocab_size
    lp = torch.where(valid, top - d, 0.0).float()
    return torch.where(valid, ids, -1).to(torch.int32), lp
