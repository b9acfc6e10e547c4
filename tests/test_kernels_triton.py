"""impl="triton" (the streamed pass with Triton row kernels) against the float64 oracle: under TRITON_INTERPRET=1
on CPU in fp32, fp16 AND bf16, and on CUDA at Qwen2.5-3B shapes (marked gpu).

TRITON_INTERPRET must be set before triton is imported, so on CPU `test_interpreter_suite` re-runs this file in
a subprocess with the variable set; the parent pytest process never imports triton in interpreter mode. The row
kernels use no tl.dot (the GEMMs are torch's), so the interpreter runs them faithfully in every dtype.

Interpreter shapes span several blocks in every dimension: N = 40 rows in row blocks of 32 (a partial last
block), V = 1003 in chunks of 128 (a partial last chunk) and row-kernel tiles of 32 columns, H = 24 + 40 one-hot
units in tiles of 16, and k up to 64 in steps of 16 in the dh kernel.

Tolerances, against eager float64 on exactly the rounded inputs (so input rounding costs nothing):
- loss, per row: 1e-5 relative (plus 1e-7 of the largest row, for rows whose loss is ~0). The logits are fp32
  sums of exact products in every dtype and the row math is fp64, so the loss error is fp32 GEMM rounding.
- dh, per row (the worst row's relative error): fp32 1e-4; half 2u (u = 2^-11 fp16, 2^-8 bf16) plus what rounding
  that row of the truth to the output dtype costs. E = exp(s - m) is rounded once to the input dtype for the
  second GEMM (u), and the K part and dh are summed in fp32 and cast once.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from kernel_cases import Case, make_case, make_regime, opts_of, regime_opts, run_under_interpreter
from ssb_kernels import KDOptions, sparse_kd_ce_loss, sparse_kd_loss
from ssb_kernels.reference import sparse_kd_eager

try:  # a dev dependency; a bare GPU image may lack it, and then only the property test is skipped
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="run by test_interpreter_suite (subprocess)")
needs_triton = pytest.mark.skipif(not (INTERPRET or CUDA), reason="run by test_interpreter_suite (subprocess)")
gpu_only = pytest.mark.skipif(INTERPRET or not CUDA, reason="needs a CUDA device")
DEV = "cuda" if CUDA and not INTERPRET else "cpu"
SMALL = {"chunk_size": 128, "row_block": 32}  # interpreter blocking: several row blocks and chunks (see above)
LOSS_RTOL = 1e-5
DH_RTOL = {torch.float32: 1e-4, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}
HALF = [torch.float32, torch.float16, torch.bfloat16]


def row_rel(got: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(N,) relative error of each row (rows of a 2-D tensor, or entries of a 1-D one) against the truth."""
    g, t = got.double().reshape(got.shape[0], -1), truth.reshape(truth.shape[0], -1)
    return (g - t).norm(dim=1) / t.norm(dim=1).clamp(min=1e-300)


def run_kd(fn, hid, w, ids, lp, c, mask, opts, weight_grad=False):
    """loss (per row: reduction "none"), dh (and dW) of ``fn`` with a non-uniform upstream gradient."""
    h, wt = hid.detach().requires_grad_(True), w.detach().requires_grad_(weight_grad)
    loss = fn(h, wt, ids, lp, c, mask, opts)
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * up).sum().backward()
    return [loss.detach(), h.grad] + ([wt.grad] if weight_grad else [])


def triton_kd(h, w, ids, lp, c, mask, opts):
    from ssb_kernels.streamed_kd import sparse_kd_triton

    return sparse_kd_triton(h, w, ids, lp, c, mask, opts)


def check_triton(inputs, opts: KDOptions, dtype: torch.dtype, weight_grad: bool = False, mask=None) -> None:
    """Triton on DEV in ``dtype`` vs eager float64 on the same rounded inputs: per-row loss and dh, normwise dW."""
    hid, w, ids, lp, c = (t.to(DEV) for t in inputs)
    hid, w = hid.to(dtype), w.to(dtype)
    mask = None if mask is None else mask.to(DEV)
    opts = KDOptions(**{**opts.__dict__, "reduction": "none"})
    truth = run_kd(sparse_kd_eager, hid.double(), w.double(), ids, lp.double(), c.double(), mask, opts, weight_grad)
    got = run_kd(triton_kd, hid, w, ids, lp, c, mask, opts, weight_grad)
    assert got[0].device.type == DEV and got[1].dtype == dtype  # ran on the device, one cast back to the input
    for name, g, t in zip(("loss", "dh", "dW"), got, truth):
        assert torch.isfinite(g).all(), f"triton {name} [{dtype}]: non-finite ({opts})"
        assert float(t.norm()) > 0, f"oracle {name} is degenerate"
    loss, t_loss = got[0].double(), truth[0]
    err = (loss - t_loss).abs()
    allowed = LOSS_RTOL * t_loss.abs() + 1e-7 * float(t_loss.abs().max())
    bad = int((err - allowed).argmax())
    assert bool((err <= allowed).all()), f"loss [{dtype}] row {bad}: err {float(err[bad]):.2e} ({opts})"
    live = truth[1].norm(dim=1) > 0  # masked rows: the truth is 0 and so must be the kernel's
    assert bool((got[1][~live] == 0).all()), "dh of a masked row is not exactly zero"
    out_round = row_rel(truth[1].to(dtype), truth[1]) if dtype != torch.float32 else torch.zeros_like(t_loss)
    rr = row_rel(got[1], truth[1])
    limit = DH_RTOL[dtype] + out_round
    worst = int(torch.where(live, rr - limit, -1.0).argmax())
    assert bool((rr[live] <= limit[live]).all()), (
        f"dh [{dtype}] worst row {worst}: rel err {float(rr[worst]):.2e} > {float(limit[worst]):.2e} ({opts})"
    )
    if weight_grad:
        out_round_w = float((truth[2].to(dtype).double() - truth[2]).norm() / truth[2].norm())
        err_w = float((got[2].double() - truth[2]).norm() / truth[2].norm())
        assert err_w <= DH_RTOL[dtype] + out_round_w, f"dW [{dtype}]: normwise rel err {err_w:.2e}"


@pytest.mark.skipif(INTERPRET or CUDA, reason="already in the interpreter or on CUDA")
def test_interpreter_suite():
    """Run this file's Triton tests under TRITON_INTERPRET=1 in a fresh process (CPU CI)."""
    run_under_interpreter(__file__, timeout=900)


@pytest.mark.skipif(INTERPRET, reason="the interpreter runs CPU tensors by design")
def test_triton_refuses_cpu_tensors():
    pytest.importorskip("triton")
    x = make_case(Case("cpu", n=4, h=8, v=32, k=2), torch.float32)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors, got tensors on cpu"):
        sparse_kd_loss(x["hidden"], x["weight"], x["topk_ids"], x["topk_logprobs"], impl="triton")


# ---- the interpreter: every dtype, the regimes real models produce
@interpreter_only
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(
    "lead,tail,temperature,k,loss",
    [(0.0, 0.05, 2.0, 16, "tail"), (20.0, 0.4, 2.0, 5, "reverse_kl"), (60.0, 0.0, 1.0, 64, "jsd"),
     (30.0, 1e-6, 1.0, 1, "renorm")],
)  # fmt: skip
def test_triton_every_dtype_matches_float64(lead, tail, temperature, k, loss, dtype):
    inputs = make_regime(40, 24, 1003, k, lead, tail, temperature, 7)
    check_triton(inputs, regime_opts(temperature, loss, "none", **SMALL), dtype)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_masked_rows_padding_and_weight_grad(dtype):
    inputs = list(make_regime(40, 24, 1003, 16, 15.0, 0.05, 2.0, 3))
    inputs[2] = inputs[2].clone()
    inputs[2][::4, -3:] = -1  # padding on a quarter of the rows
    mask = torch.arange(40) % 5 != 0  # 20% of the rows masked
    check_triton(inputs, KDOptions(2.0, "tail", "none", **SMALL), dtype, weight_grad=True, mask=mask)


@interpreter_only
@pytest.mark.parametrize("lead,n,v,k", [(40.0, 40, 130, 130), (120.0, 66, 777, 8)])
def test_triton_k_equals_vocab_and_lead_past_fp32_exp_range(lead, n, v, k):
    # k = V: no off-K column at all (p_t = q_t = 0 exactly); lead 120: the off-K max needs no redo pass
    check_triton(make_regime(n, 16, v, k, lead, 0.4, 1.0, 3), KDOptions(1.0, "tail", "none", **SMALL), torch.bfloat16)


@interpreter_only
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_triton_kd_ce_one_pass_matches_the_two_float64_losses(dtype):
    hid, w, ids, lp, c = make_regime(40, 24, 1003, 16, 10.0, 0.1, 2.0, 11)
    labels = torch.where(torch.arange(40) % 3 == 0, ids[:, 0], torch.randint(0, 1003, (40,)))  # in K or not
    labels[5] = -1  # an ignored label

    def both(fn, h, wt, lpx, cx, impl):
        h = h.detach().requires_grad_(True)
        kd, ce = fn(h, wt, ids, lpx, labels, lse_t=cx, temperature=2.0, reduction="sum", impl=impl)
        (0.7 * kd + 1.3 * ce).backward()
        return kd.detach(), ce.detach(), h.grad

    hid, w = hid.to(dtype), w.to(dtype)  # the oracle sees exactly the rounded inputs
    truth = both(sparse_kd_ce_loss, hid.double(), w.double(), lp.double(), c.double(), "eager")
    got = both(sparse_kd_ce_loss, hid, w, lp, c, "triton")
    for name, g, t in zip(("kd", "ce"), got[:2], truth[:2]):
        assert abs(float(g) - float(t)) <= LOSS_RTOL * abs(float(t)), f"{name} [{dtype}]: {float(g)} vs {float(t)}"
    rr = row_rel(got[2], truth[2])
    limit = DH_RTOL[dtype] + (row_rel(truth[2].to(dtype), truth[2]) if dtype != torch.float32 else 0.0)
    assert bool((rr <= limit).all()), f"dh [{dtype}] worst row rel err {float(rr.max()):.2e}"


if given is not None:

    @interpreter_only
    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(
        lead=st.sampled_from([0.0, 3.0, 8.6, 15.0, 20.0, 30.0, 45.0, 60.0]),
        tail=st.sampled_from([0.0, 1e-6, 1e-4, 0.05, 0.4, 0.5]),
        temperature=st.sampled_from([1.0, 2.0]),
        k=st.sampled_from([1, 5, 16, 33]),
        loss=st.sampled_from(["tail", "renorm", "reverse_kl", "jsd"]),
        dtype=st.sampled_from(HALF),
        seed=st.integers(0, 1000),
    )
    def test_triton_regimes_match_float64(lead, tail, temperature, k, loss, dtype, seed):
        inputs = make_regime(40, 24, 1003, k, lead, tail, temperature, seed)
        check_triton(inputs, regime_opts(temperature, loss, "none", **SMALL), dtype)


@needs_triton
def test_triton_all_masked_is_zero_and_empty_batch():
    x = make_case(Case("m", n=8, h=16, v=64, k=4), torch.float32)
    h = x["hidden"].to(DEV).requires_grad_(True)
    mask = torch.zeros(8, dtype=torch.bool, device=DEV)
    loss = sparse_kd_loss(h, x["weight"].to(DEV), x["topk_ids"].to(DEV), x["topk_logprobs"].to(DEV), mask=mask,
                          impl="triton")  # fmt: skip
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(h.grad == 0)
    h, w = torch.randn(0, 16, device=DEV, requires_grad=True), torch.randn(40, 16, device=DEV)
    loss = sparse_kd_loss(h, w, torch.zeros(0, 4, dtype=torch.long, device=DEV), torch.zeros(0, 4, device=DEV),
                          impl="triton")  # fmt: skip
    loss.backward()
    assert float(loss.detach()) == 0.0 and h.grad.shape == (0, 16)


@interpreter_only
@pytest.mark.parametrize("rise", [0.0, 25.0])
def test_triton_and_chunked_capture_the_same_k_logits_and_off_k_sums(rise):
    """The Triton row step and the torch row step see the same fp32 logits: in fp32 their off-K LSE and mean
    head rows agree with float64, and the K logits are captured at the same slots. ``rise`` lifts the last 200
    columns' logits so the off-K max jumps past the lazy reference in a late chunk: the accumulator rows must
    then be rescaled (without it, the early chunks would outweigh the rest by e^25)."""
    from ssb_kernels.streamed import Blocking, off_results, stream
    from ssb_kernels.streamed_kd import row_step

    hid, w, ids, _, _ = make_regime(40, 24, 1003, 16, 30.0, 0.05, 1.0, 2)
    hid = torch.cat([hid, torch.ones(40, 1)], 1)  # a constant unit: its head column adds `rise` to late columns
    w = torch.cat([w, torch.zeros(1003, 1)], 1)
    w[-200:, -1] = rise
    valid = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) > 0.1
    b = Blocking(32, 128, 32, 16)
    res = {rows: stream(hid, w, ids, valid, (0.5, 1.0), True, b=b, **row_step(rows)) for rows in ("torch", "triton")}
    assert torch.equal(res["torch"].s_x, res["triton"].s_x)  # the same fp32 logits, captured at the same slots
    in_k = torch.zeros(40, 1003, dtype=torch.bool).scatter(1, ids, valid)
    z = (hid.double() @ w.double().t()).masked_fill(in_k, float("-inf"))
    for rows, st in res.items():
        logs, pws = off_results(st)
        for sc, lo, pw in zip((0.5, 1.0), logs, pws):
            truth = torch.logsumexp(z * sc, -1)
            assert float((lo.double() - truth).abs().max()) < 1e-5, rows
            mean_w = torch.softmax(z * sc, -1) @ w.double()
            assert float(row_rel(pw, mean_w).max()) < 1e-5, (rows, sc)


# ---- CUDA: inputs created on the device, Qwen2.5-3B's head, bf16 against eager float64
@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "lead,tail,temperature,k,loss",
    [(0.0, 0.05, 2.0, 64, "tail"), (20.0, 0.4, 2.0, 64, "tail"), (60.0, 0.0, 1.0, 64, "tail"),
     (30.0, 1e-8, 2.0, 64, "reverse_kl"), (20.0, 0.4, 2.0, 64, "jsd")],
)  # fmt: skip
def test_triton_cuda_qwen_shapes(lead, tail, temperature, k, loss, dtype):
    # H = 2040 + 8 one-hot units = 2048; 8 groups of rows share a top token that leads by at least `lead`
    inputs = qwen_regime(lead, tail, temperature, k)
    check_triton(inputs, regime_opts(temperature, loss, "none"), dtype)


@functools.lru_cache(maxsize=2)
def qwen_regime(lead, tail, temperature, k):
    return make_regime(2048, 2040, 151_936, k, lead, tail, temperature, 0, groups=8)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", [Case("masked-pad", n=2048, h=256, v=32000, k=64, mask_frac=0.2, pad=3)])
def test_triton_cuda_awkward_case(case):
    x = make_case(case, torch.bfloat16)
    check_triton((x["hidden"], x["weight"], x["topk_ids"], x["topk_logprobs"], x["lse_t"]), opts_of(case),
                 torch.bfloat16, mask=x["mask"])  # fmt: skip


@pytest.mark.gpu
@gpu_only
def test_vendor_gemm_fallbacks_agree_with_the_fp32_output_gemms(monkeypatch):
    """Both half-GEMM forms in streamed.vendor_caps (and the widened fallback) give the same logits and sums."""
    import ssb_kernels.streamed as streamed

    g = torch.Generator().manual_seed(0)
    a, wt = (torch.randn(256, 512, generator=g) / 8).cuda().bfloat16(), torch.randn(384, 512, generator=g).cuda()
    wt = wt.bfloat16()
    want = a.double() @ wt.double().t()
    outs = []
    for caps in ({"mm": True, "addmm": True}, {"mm": True, "addmm": False}, {"mm": False, "addmm": False}):
        monkeypatch.setattr(streamed, "_CAPS", caps)
        s = streamed.mm_acc(a, wt, out=torch.empty(256, 384, device="cuda"))
        acc = torch.ones(256, 512, device="cuda")
        streamed.addmm_acc_(acc, s.bfloat16(), wt)
        outs.append((s, acc))
        assert float((s.double() - want).abs().max()) < 1e-3
    for s, acc in outs[1:]:
        assert torch.allclose(s, outs[0][0], rtol=1e-5, atol=1e-4) and torch.allclose(acc, outs[0][1], rtol=1e-4)
