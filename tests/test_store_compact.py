"""The compact store format: lossless ids, companded log-probs within their stated bound, exact c_T and realised-token
log-probs, the byte budget, readers of both formats, and the KD loss on compact targets against exact ones."""

from __future__ import annotations

import math

import pytest
import torch
from ssb_kernels import sparse_kd_loss

from ssb.store import StoreExample, StoreWriter, TeacherStore
from ssb.store.compact import code_bits, decode, encode, id_bits, pack_bits, unpack_bits
from ssb.store.format import _mmap_tensors


@pytest.mark.parametrize("bits", [1, 3, 10, 16, 18, 19])
def test_bit_packing_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randint(0, 1 << bits, (7, 13), generator=g)
    packed = pack_bits(x, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, math.ceil(13 * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, 13), x)


def teacher(n, v, k, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    lp, ids = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * scale, -1).topk(k, -1)
    return ids, lp


@pytest.mark.parametrize("v", [795, 49_152, 151_936, 262_144])
def test_ids_are_exact_and_log_probs_within_the_companded_step(v):
    ids, lp = teacher(40, v, 64, seed=v)
    ids[5, 50:] = -1  # padding
    d_ids, d_lp = decode(encode(ids, lp.float(), v), 64, v)
    assert torch.equal(d_ids, ids.to(torch.int32))
    valid = ids >= 0
    assert torch.equal(d_lp[~valid], torch.zeros_like(d_lp[~valid]))
    gap = lp[:, :1] - lp  # d_j >= 0
    big = (lp[:, :1] - lp.masked_fill(~valid, float("inf")).amin(1, keepdim=True)).clamp(min=1e-12)
    # half a grid step in u, mapped back through d = -3 log(1 - u (1 - e^{-D/3})): |dd/du| = 3 (1 - e^{-D/3}) e^{d/3}
    bound = 0.5 / ((1 << code_bits(v)) - 1) * 3 * (-torch.expm1(-big / 3)) * torch.exp(gap / 3) * 1.01 + 1e-6
    err = (d_lp.double() - lp).abs()
    assert bool((err <= bound)[valid].all()), float((err - bound)[valid].max())
    assert float(err[:, 0].max()) < 1e-6  # the top entry is exact (fp32)
    assert id_bits(v) + code_bits(v) <= 28


def _example(i, ids, lp, v):
    r = ids.shape[0]
    return StoreExample(example_index=i, token_ids=torch.arange(r, dtype=torch.int32) % v, topk_ids=ids.to(torch.int32),
                        topk_logprobs=lp.float(), lse={2.0: torch.linspace(0.1, 0.3, r)},
                        token_logprob=-torch.linspace(0.0, 5.0, r))  # fmt: skip


def test_compact_store_reads_back_with_exact_side_values_and_fits_the_budget(tmp_path):
    v, k = 151_936, 64
    ids, lp = teacher(300, v, k)
    stores = {}
    for fmt in ("exact", "compact"):
        header = {"fingerprint": "f", "model": {"id": "m", "vocab_size": v}, "exact_temperatures": [1.0, 2.0]}
        w = StoreWriter(tmp_path / fmt, header, k=k, value_dtype="float32", temperatures=[1.0, 2.0], store_format=fmt)
        w.write_shard(0, [_example(0, ids[:120], lp[:120], v), _example(1, ids[120:], lp[120:], v)], [])
        w.finish(1)
        stores[fmt] = TeacherStore(tmp_path / fmt)
    exact, comp = stores["exact"], stores["compact"]
    assert comp.manifest["store_format"] == "compact" and exact.manifest["store_format"] == "exact"
    assert comp.manifest["compact"]["id_bits"] == 18 and comp.manifest["compact"]["code_bits"] == 10
    for i in range(2):
        a, b = exact[i], comp[i]
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.token_ids, b.token_ids)
        assert torch.equal(a.token_logprob, b.token_logprob) and torch.equal(a.lse[2.0], b.lse[2.0])
        assert float((a.topk_logprobs - b.topk_logprobs).abs().max()) < 0.05

    def per_row(store):  # tensor bytes per row (per-example offsets and the file header are amortised away)
        t = _mmap_tensors(store.path / store.manifest["shards"][0]["file"])
        return sum(x.numel() * x.element_size() for n, x in t.items() if n not in ("offsets", "example_index")) / 300

    assert per_row(comp) <= 3.5 * k + 24, per_row(comp)  # 248 B at k = 64, with one stored c_T (T = 2)
    assert per_row(exact) == 8 * k + 12  # 524 B: fp32 log-prob + int32 id per entry, token id, its log-prob, c_2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_on_compact_targets_is_within_1e_3_of_exact(temperature):
    v, k, n, h = 49_152, 32, 64, 32
    g = torch.Generator().manual_seed(7)
    ids, lp = teacher(n, v, k, seed=3, scale=4.0)
    hid, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / h**0.5
    _, d_lp = decode(encode(ids, lp.float(), v), k, v)
    loss = lambda x: sparse_kd_loss(hid, w, ids, x, temperature=temperature, impl="chunked")  # noqa: E731
    exact, comp = float(loss(lp.float())), float(loss(d_lp))
    assert exact > 0.1 and abs(comp - exact) / exact <= 1e-3, (exact, comp)
