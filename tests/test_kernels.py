"""ssb_kernels eager + chunked paths against a float64 evaluation of SPEC.md (ground-truth oracle rule)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import CASES, Case, assert_oracle, make_case, opts_of
from ssb_kernels import KDOptions, sparse_kd_loss, topk_logprobs
from ssb_kernels.options import TopkOptions
from ssb_kernels.reference import topk_logprobs_eager
from ssb_kernels.streamed_kd import sparse_kd_chunked
from ssb_kernels.topk_stream import topk_logprobs_chunked


def chunked_fn(case: Case, chunk: int = 97):
    """The chunked path with a small odd chunk so every case crosses many chunk boundaries."""
    o = opts_of(case, chunk_size=chunk)
    return lambda h, w, i, lp, lse, m: sparse_kd_chunked(h, w, i, lp, lse, m, o)


# half-precision inputs on a representative subset
HALF_SUBSET = ("odd", "masked20-pad", "weight-grad", "kV", "reverse-T2-masked-pad", "jsd-peaked-wgrad")
ORACLE_PARAMS = [
    pytest.param(c, d, id=f"{c.name}-{str(d)[6:]}")
    for d in (torch.float32, torch.float16, torch.bfloat16)
    for c in CASES
    if d == torch.float32 or c.name in HALF_SUBSET
]


@pytest.mark.parametrize("case,dtype", ORACLE_PARAMS)
def test_chunked_matches_oracle(case: Case, dtype):
    assert_oracle(case, make_case(case, dtype), chunked_fn(case), dtype)


@pytest.mark.parametrize("impl", ["eager", "chunked"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_support_equals_ssb_reference_kl(impl, temperature):
    """K = whole vocabulary: loss == F.kl_div(log_softmax(z/T), softmax(t/T), batchmean) * T^2 (SSB reference)."""
    x = make_case(Case("dense", n=9, h=16, v=50, k=50, temperature=temperature), torch.float64)
    t = torch.randn(9, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    logp_t = torch.log_softmax(t, -1)
    ids = torch.arange(50).repeat(9, 1)
    mask = torch.tensor([True, False] * 4 + [True])
    got = sparse_kd_loss(x["hidden"], x["weight"], ids, logp_t, mask=mask, temperature=temperature, impl=impl)
    z = x["hidden"] @ x["weight"].t()
    ref = F.kl_div(
        F.log_softmax(z[mask] / temperature, -1), F.softmax(t[mask] / temperature, -1), reduction="batchmean"
    )
    torch.testing.assert_close(got, ref * temperature**2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["eager", "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_gives_zero_loss_and_grads(impl, reduction):
    x = make_case(Case("all-masked", n=5, h=8, v=40, k=4), torch.float32)
    h = x["hidden"].requires_grad_(True)
    w = x["weight"].requires_grad_(True)
    ids = x["topk_ids"].clone()
    ids[2] = -1  # a row with no valid id is also not counted
    mask = torch.tensor([False, False, True, False, False])
    loss = sparse_kd_loss(h, w, ids, x["topk_logprobs"], mask=mask, reduction=reduction, impl=impl)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_tail_never_exceeds_full_kl_and_renorm_drives_tail():
    """SPEC section 2: merging the tail into one outcome cannot increase KL."""
    case = Case("bound", n=16, h=16, v=300, k=5)
    x = make_case(case, torch.float64)
    t = torch.randn(16, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    logp_t = torch.log_softmax(t, -1)
    lp, ids = logp_t.topk(5, -1)
    lse = torch.logsumexp(logp_t, -1)
    sparse = sparse_kd_loss(x["hidden"], x["weight"], ids, lp, lse_t=lse, reduction="none", impl="chunked")
    full = sparse_kd_loss(x["hidden"], x["weight"], torch.arange(300).repeat(16, 1), logp_t, reduction="none")
    assert torch.all(sparse <= full + 1e-12) and torch.all(sparse >= 0)


def test_gradcheck_chunked_float64():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    w = (torch.randn(23, 6, dtype=torch.float64, generator=g) * 0.5).requires_grad_(True)
    ids = torch.stack([torch.randperm(23, generator=g)[:5] for _ in range(4)])
    ids[1, 3:] = -1
    full = torch.log_softmax(torch.randn(4, 23, dtype=torch.float64, generator=g), -1)  # teacher at T = 1
    lp = full.gather(1, ids.clamp(min=0))
    mask = torch.tensor([True, True, False, True])
    exact = torch.logsumexp(full / 2.0, -1)
    for variant, reduction, lse_t in [("tail", "mean", None), ("renorm", "none", None), ("tail", "sum", exact)]:
        o = KDOptions(temperature=2.0, variant=variant, reduction=reduction, chunk_size=7)

        def fn(a, b, o=o, lse_t=lse_t):
            return sparse_kd_chunked(a, b, ids, lp, lse_t, mask, o)

        assert torch.autograd.gradcheck(fn, (h, w)), (variant, reduction)


@pytest.mark.parametrize("k,temps", [(1, (1.0,)), (9, (1.0, 2.0, 0.5)), (200, (2.0,))])
def test_topk_logprobs_chunked_matches_float64(k, temps):
    g = torch.Generator().manual_seed(k)
    h = torch.randn(13, 24, generator=g)
    w = torch.randn(200, 24, generator=g) / 3
    truth = topk_logprobs_eager(h.double(), w.double(), TopkOptions(k=k, temperatures=temps))
    got = topk_logprobs_chunked(h, w, TopkOptions(k=k, temperatures=temps, chunk_size=31))
    assert got[0].dtype == torch.int64 and got[1].shape == (13, k) and got[2].shape == (13, len(temps))
    assert torch.equal(got[0], truth[0])  # ids sorted by descending value
    torch.testing.assert_close(got[1].double(), truth[1], rtol=0, atol=2e-5)
    torch.testing.assert_close(got[2].double(), truth[2], rtol=0, atol=2e-5)
    if 1.0 in temps:
        assert got[2][:, temps.index(1.0)].abs().max() < 1e-5  # c_1 = 0
    if k == 200:
        assert torch.allclose(got[1].exp().sum(-1), torch.ones(13), atol=1e-5)  # k = V: all the mass


def test_topk_public_api_bf16_and_c_t_consistency():
    """c_T from topk_logprobs with k = V feeds sparse_kd_loss to the dense KL; bf16 inputs run in fp32."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 16, generator=g).bfloat16(), torch.randn(64, 16, generator=g).bfloat16()
    ids, lp, lse = topk_logprobs(h, w, 64, temperatures=(2.0,))
    assert lp.dtype == torch.float32
    exact = torch.logsumexp(torch.log_softmax(h.float() @ w.float().t(), -1) / 2.0, -1)
    torch.testing.assert_close(lse[:, 0], exact, rtol=0, atol=1e-5)


BAD = [
    ("hidden", lambda x: x.update(hidden=x["hidden"][:, :-1]), "disagree on H"),
    ("ids-dtype", lambda x: x.update(topk_ids=x["topk_ids"].float()), "int32/int64"),
    ("ids-range", lambda x: x["topk_ids"].__setitem__((0, 0), 40), "must lie in"),
    ("ids-neg", lambda x: x["topk_ids"].__setitem__((0, 0), -2), "must lie in"),
    ("dup", lambda x: x["topk_ids"].__setitem__((0, 1), int(x["topk_ids"][0, 0])), "duplicate"),
    ("lp-shape", lambda x: x.update(topk_logprobs=x["topk_logprobs"][:, :2]), "must match"),
    ("lse-shape", lambda x: x.update(lse_t=torch.zeros(3)), "lse_t must be"),
    ("mask-shape", lambda x: x.update(mask=torch.ones(2, dtype=torch.bool)), "mask must be"),
    ("nan", lambda x: x["hidden"].__setitem__((0, 0), float("nan")), "NaN or inf"),
    ("int-hidden", lambda x: x.update(hidden=x["hidden"].long()), "floating-point"),
]


@pytest.mark.parametrize("name,mutate,match", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("impl", ["eager", "chunked"])
def test_validation_errors(name, mutate, match, impl):
    x = make_case(Case("bad", n=5, h=8, v=40, k=4), torch.float32)
    x["lse_t"] = None
    mutate(x)
    with pytest.raises(ValueError, match=match):
        sparse_kd_loss(x["hidden"], x["weight"], x["topk_ids"], x["topk_logprobs"], lse_t=x["lse_t"],
                       mask=x["mask"], impl=impl)  # fmt: skip


def test_a_frozen_head_is_scanned_for_nan_once_and_again_after_any_write(monkeypatch):
    from ssb_kernels import options

    x = make_case(Case("head", n=5, h=8, v=40, k=4), torch.float32)
    scanned = []
    scan = options.check_finite
    monkeypatch.setattr(options, "check_finite", lambda name, t, **kw: scanned.append(name) or scan(name, t, **kw))

    def loss(w: torch.Tensor) -> torch.Tensor:
        return sparse_kd_loss(x["hidden"], w, x["topk_ids"], x["topk_logprobs"], impl="chunked")

    w = x["weight"].clone()
    for _ in range(3):
        loss(w.detach())  # a training step passes a fresh detached view of the same head
    assert scanned.count("weight") == 1
    w.detach()[3, 1] = float("inf")  # a write through any view bumps the shared version counter
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        loss(w)
    fresh = x["weight"].clone()
    fresh[0, 0] = float("nan")  # another head (even at a freed head's address) is scanned
    del w
    with pytest.raises(ValueError, match="weight contains NaN or inf"):
        loss(fresh)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": 0.0}, "temperature"), ({"variant": "jsd"}, "variant"), ({"reduction": "avg"}, "reduction"),
     ({"impl": "cuda"}, "impl")],
)  # fmt: skip
def test_option_errors(kwargs, match):
    x = make_case(Case("bad", n=3, h=8, v=40, k=4), torch.float32)
    with pytest.raises(ValueError, match=match):
        sparse_kd_loss(x["hidden"], x["weight"], x["topk_ids"], x["topk_logprobs"], **kwargs)
    with pytest.raises(ValueError, match="k must be"):
        topk_logprobs(x["hidden"], x["weight"], 41)


def test_auto_on_cpu_is_eager_for_small_heads_chunked_for_large_and_frozen_head_gets_no_grad():
    from ssb_kernels.options import AUTO_EAGER_NV

    # (n, v): a toy-sized vocabulary at any N, N x V just under 2^22 -> eager; N x V = 2^22 with V > 1024 -> chunked
    for (n, v), fused in [((4, 40), False), ((8192, 795), False), ((255, 16384), False), ((256, 16384), True)]:
        x = make_case(Case("auto", n=n, h=8, v=v, k=4), torch.float32)
        h = x["hidden"].requires_grad_(True)
        loss = sparse_kd_loss(h, x["weight"], x["topk_ids"], x["topk_logprobs"])
        assert type(loss.grad_fn).__name__.startswith("_SparseKDStreamed") == fused, (n, v, n * v >= AUTO_EAGER_NV)
        loss.backward()
        assert x["weight"].grad is None and h.grad is not None
        assert torch.isfinite(h.grad).all() and float(h.grad.norm()) > 0
    assert opts_of(CASES[0]).chunk_size > 0


@pytest.mark.parametrize("impl", ["eager", "chunked"])
def test_empty_batch(impl):
    """N = 0 rows (a micro-batch with nothing to distil): zero loss, empty grads, empty top-k."""
    h, w = torch.randn(0, 8, requires_grad=True), torch.randn(40, 8)
    loss = sparse_kd_loss(h, w, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), impl=impl)
    loss.backward()
    assert float(loss.detach()) == 0.0 and h.grad.shape == (0, 8)
    ids, lp, lse = topk_logprobs(h.detach(), w, 3, temperatures=(1.0, 2.0), impl=impl)
    assert ids.shape == lp.shape == (0, 3) and lse.shape == (0, 2)


def test_excluded_ids_grouped_by_block_and_chunk_are_exactly_each_chunks_k_columns():
    from ssb_kernels.streamed import Blocking, Excluded, blocking

    g = torch.Generator().manual_seed(0)
    for n, v, k, c, rows in [(7, 1001, 5, 97, 3), (5, 64, 64, 24, 5), (3, 100, 1, 1000, 2), (0, 50, 3, 7, 4)]:
        idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]) if n else torch.zeros(0, k).long()
        valid = torch.rand(n, k, generator=g) > 0.2
        b = Blocking(rows, c, 32, 16)
        ex = Excluded(idx, valid, b, v, per_row=True)
        for blk, r0 in enumerate(range(0, n, rows)):
            nr = min(rows, n - r0)
            offs = ex.offsets(blk, 0)
            for chunk, v0 in enumerate(range(0, v, c)):
                width = min(c, v - v0)
                want = torch.zeros(nr, width, dtype=torch.bool)  # brute force: the valid K ids inside this tile
                want_slot = torch.zeros(nr, width, dtype=torch.long)
                for r, j in zip(*torch.nonzero(valid[r0 : r0 + nr], as_tuple=True)):
                    if v0 <= idx[r0 + r, j] < v0 + width:
                        want[r, idx[r0 + r, j] - v0] = True
                        want_slot[r, idx[r0 + r, j] - v0] = (r0 + r) * k + j
                lo, hi = ex.hits(blk, chunk)
                got = torch.zeros(nr, width, dtype=torch.bool)
                got[ex.row[lo:hi], ex.col[lo:hi].long()] = True
                assert torch.equal(got, want), (n, v, k, c, v0)
                assert torch.equal(want_slot[ex.row[lo:hi], ex.col[lo:hi].long()], ex.slot[lo:hi])
                offs = ex.offsets(blk, chunk)  # per-row CSR (Triton): row r's hits are offs[r]:offs[r + 1]
                assert int(offs[0]) == lo and int(offs[nr]) == hi
                for r in range(nr):
                    assert torch.all(ex.row[int(offs[r]) : int(offs[r + 1])] == r)
    # CPU: the chunk width shrinks with the rows so the (N, C) buffer stays at 2^21 elements, within [128, chunk_size]
    cols = [blocking(n, 10**6, torch.device("cpu"), 4096).cols for n in (2048, 8192, 10**6)]
    assert cols == [1024, 256, 128]
