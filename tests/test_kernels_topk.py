"""Teacher capture (`topk_logprobs`) on the streamed pass against a float64 oracle, in fp32, fp16 and bf16.

impl="chunked" runs in this process. impl="triton" runs on CPU only under TRITON_INTERPRET=1, which must be set
before triton is imported, so `test_interpreter_suite` re-runs this file in a subprocess with it set (the
pattern of test_kernels_triton.py). The GPU test runs impl="triton" at Qwen2.5-3B shapes (skipped without CUDA).

The oracle is log_softmax in float64 of exactly the rounded inputs (h.double() @ w.double().T), so what is left
to measure is the kernel's own fp32 arithmetic.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_cases import run_under_interpreter
from ssb_kernels import topk_logprobs
from ssb_kernels.options import TopkOptions

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = [
    pytest.param("chunked", marks=pytest.mark.skipif(INTERPRET, reason="runs in the parent process")),
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="run by test_interpreter_suite")),
]

# Tolerance, relative to each row's scale s = max_v |z_v| + |lse_1| (both log-probs l = z - lse_1 and
# c_T = LSE_v(l_v / T) are formed from numbers of that size, so that is their conditioning; a kernel returning
# zeros fails it, since the non-top log-probs and c_2 are O(s)). The kernel's errors: each logit is an H-term
# fp32 dot product of the same rounded inputs (error ~ sqrt(H) u |h||w| typically, u = 2^-24), and the row sums
# are fp32 over V terms per temperature (relative error ~ log2(V) u, times 1/T in c_T). Measured worst on the
# interpreter shapes here: 2.4e-7 s (4 u; fp16), 1.7e-7 (fp32), 8e-8 (bf16). RTOL = 32 u (1.9e-6) leaves 8x headroom and
# stays close to fp32 resolution. Ties: oracle values within 2 RTOL s of the k-th value are interchangeable.
RTOL = 32 * 2.0**-24
RTOL_GPU = 1e-5  # cuBLAS sums the H = 2048 products in its own order and blocking (still fp32)


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0, peaked: int | None = None):
    """hidden (N, H) ~ N(0, 1), weight (V, H) ~ N(0, 1/16), rounded to ``dtype``. ``peaked``: that row is
    one-hot (8 on unit 0) and vocabulary row V // 2 has 8.5 there, so its top logit (68) leads by ~60."""
    g = torch.Generator().manual_seed(seed)
    hid, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 4
    if peaked is not None:
        hid[peaked] = 0.0
        hid[peaked, 0] = 8.0
        w[v // 2, 0] = 8.5
    return hid.to(dtype), w.to(dtype)


def check_capture(got, hid, w, k: int, temps, rtol: float = RTOL) -> dict:
    """Assert (ids, logprobs, c_T) against the float64 oracle of the rounded inputs; return the figures."""
    ids, lp, c = got
    z = hid.double() @ w.double().t()  # (N, V) the oracle's logits
    n, v = z.shape
    assert ids.dtype == torch.int64 and lp.dtype == c.dtype == torch.float32
    assert ids.shape == lp.shape == (n, k) and c.shape == (n, len(temps))
    if n == 0:
        return {}
    lse = torch.logsumexp(z, 1)
    logp = z - lse[:, None]
    scale = (z.abs().amax(1) + lse.abs())[:, None]  # (N, 1)
    assert bool(((ids >= 0) & (ids < v)).all()), "ids out of range"
    assert k == 1 or bool((ids.sort(1).values.diff(1) != 0).all()), "a row repeats an id"
    assert bool((lp[:, 1:] <= lp[:, :-1]).all()), "log-probs not in descending order"
    at_ids = logp.gather(1, ids)  # (N, k) the oracle at the returned ids
    err_lp = (lp.double() - at_ids).abs() / scale
    truth = logp.topk(k, 1)
    kth = truth.values[:, -1:]
    assert bool((at_ids >= kth - 2 * rtol * scale).all()), "a returned id is not in the top k (ties aside)"
    hit = (truth.indices[:, :, None] == ids[:, None, :]).any(2)  # (N, k) true ids returned
    tied = truth.values <= kth + 2 * rtol * scale  # at the k-th value within the tolerance: interchangeable
    agree = float((hit | tied).double().mean())
    c_true = torch.stack([torch.logsumexp(logp / t, 1) for t in temps], 1)
    err_c = (c.double() - c_true).abs() / scale
    r = int(err_lp.amax(1).argmax())
    assert float(err_lp.max()) <= rtol, f"row {r}: logprobs {lp[r].tolist()} vs {at_ids[r].tolist()}"
    r = int(err_c.amax(1).argmax())
    assert float(err_c.max()) <= rtol, f"row {r}: c_T {c[r].tolist()} vs {c_true[r].tolist()}"
    assert agree >= 0.99, f"ids agree on {agree:.4f} of entries (ties aside)"
    return {"agree": agree, "exact": float(hit.double().mean()), "err_lp": float(err_lp.max()),
            "err_c": float(err_c.max())}  # fmt: skip


# (name, N, H, V, k, temperatures, chunk_size, row_block, peaked row): each spans several row blocks, several
# chunks (the last one partial) and, on CPU (32-column tiles), several column tiles per chunk
CASES = [
    ("blocks-T12-peaked", 20, 64, 300, 5, (1.0, 2.0), 96, 8, 3),
    ("k1", 9, 32, 200, 1, (1.0,), 64, 4, None),
    ("kV-T05-T2", 6, 16, 100, 100, (0.5, 2.0), 40, 4, 1),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_topk_matches_float64(case, dtype, impl):
    _, n, h, v, k, temps, chunk, rows, peaked = case
    hid, w = make_inputs(n, h, v, dtype, seed=k, peaked=peaked)
    opts = dict(k=k, temperatures=temps, chunk_size=chunk, row_block=rows)
    assert -(-n // rows) >= 2 and -(-v // chunk) >= 3 and chunk > 32  # not vacuous: several of each
    if peaked is not None:
        top2 = (hid[peaked].double() @ w.double().t()).topk(2).values
        assert float(top2[0] - top2[1]) >= 60  # the confident row really leads by 60
    got = run(hid, w, impl, **opts)
    figs = check_capture(got, hid, w, k, temps)
    print(f"{impl} {dtype} {case[0]}: {figs}")
    if k == v:
        assert float((got[1].double().exp().sum(1) - 1).abs().max()) < 1e-5  # k = V holds all the mass


def run(hid, w, impl: str, **opts):
    from ssb_kernels.topk_stream import topk_logprobs_chunked

    o = TopkOptions(**opts)
    if impl == "chunked":
        return topk_logprobs_chunked(hid, w, o)
    from ssb_kernels.triton_topk import topk_logprobs_triton

    return topk_logprobs_triton(hid, w, o)


@pytest.mark.parametrize("impl", IMPLS)
def test_topk_empty_batch(impl):
    ids, lp, c = topk_logprobs(torch.zeros(0, 16), torch.randn(40, 16), 3, temperatures=(1.0, 2.0), impl=impl)
    assert ids.shape == lp.shape == (0, 3) and c.shape == (0, 2) and ids.dtype == torch.int64


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", ["falling", "rising"])
def test_topk_early_out_skips_exactly_the_chunks_without_candidates(order, impl):
    """Every row's logits fall (or rise) along the vocabulary. Falling: after the first chunk no element beats
    the k-th value, so each row merges exactly once and the buffer is untouched after it. Rising: every chunk
    beats it, so each row merges once per chunk. Both counts come from the pass's own counter, and the result
    is checked against the oracle either way (the skip changes nothing)."""
    from ssb_kernels.topk_stream import topk_pass, topk_results, torch_topk_step

    n, h, v, k, chunk = 6, 8, 256, 4, 40
    hid = torch.zeros(n, h)
    hid[:, 0] = torch.arange(1, n + 1) / 4.0
    w = torch.zeros(v, h)
    w[:, 0] = torch.arange(v, dtype=torch.float32) / 16 * (-1 if order == "falling" else 1)  # exact in bf16
    hid, w = hid.bfloat16(), w.bfloat16()
    opts = TopkOptions(k=k, temperatures=(1.0, 2.0), chunk_size=chunk, row_block=4)
    if impl == "triton":
        from ssb_kernels.triton_topk import triton_topk_step as step
    else:
        step = torch_topk_step
    st = topk_pass(hid, w, opts, step)
    n_chunks = -(-v // chunk)
    want = 1 if order == "falling" else n_chunks
    assert st.merges.tolist() == [want] * n, st.merges.tolist()
    check_capture(topk_results(st, opts), hid, w, k, (1.0, 2.0))


def test_topk_options_validated():
    for bad, msg in [(dict(chunk_size=0), "chunk_size"), (dict(row_block=0), "row_block"), (dict(k=0), "k must")]:
        with pytest.raises(ValueError, match=msg):
            TopkOptions(**{"k": 3, **bad})


@pytest.mark.skipif(not INTERPRET, reason="run by test_interpreter_suite")
def test_triton_topk_refuses_float64():
    with pytest.raises(ValueError, match="fp32"):
        topk_logprobs(torch.randn(4, 8).double(), torch.randn(30, 8).double(), 2, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERPRET, reason="needs CUDA")
def test_triton_topk_qwen_shapes_bf16_gpu():
    """H = 2048, V = 151,936, N = 2048 in bf16 on the GPU (cuBLAS logits, Triton rows) against eager fp64."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hid = torch.randn(2048, 2048, device="cuda", generator=g).bfloat16()
    w = (torch.randn(151_936, 2048, device="cuda", generator=g) * 3 / 2048**0.5).bfloat16()
    figs = check_capture(topk_logprobs(hid, w, 64, temperatures=(1.0, 2.0), impl="triton"), hid, w, 64, (1.0, 2.0),
                         rtol=RTOL_GPU)  # fmt: skip
    print(f"gpu bf16 Qwen2.5-3B shapes: {figs}")


@pytest.mark.skipif(INTERPRET or CUDA, reason="already in the interpreter or on CUDA")
def test_interpreter_suite():
    """Run this file's Triton tests under TRITON_INTERPRET=1 in a fresh process (CPU CI)."""
    run_under_interpreter(__file__, timeout=600)
