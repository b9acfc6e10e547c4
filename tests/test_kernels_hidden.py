"""hidden_kd_loss (exact teacher from its hidden states, docs/SPEC.md section 9) against the float64 eager oracle.

Chunked here in fp32 (and float64); Triton under TRITON_INTERPRET=1 in fp32, fp16 and bf16 (a subprocess, as in
tests/test_kernels_triton.py); CUDA at Qwen2.5-3B shapes (marked gpu). Tolerances, against eager float64 on exactly
the rounded inputs:
- loss: 1e-4 normwise relative over the rows (fp32 and half: the logits are fp32 sums of exact products);
- dh: the worst row's relative error, fp32 1e-3 (the issue's target; measured far below); half 2u (u = 2^-11
  fp16, 2^-8 bf16: E rounded once to the input dtype for the addmm, dh cast once) plus what rounding that row of
  the truth to the output dtype costs, the bound the sparse op's Triton tests use.
Regimes: students and teachers confident on the same token or on different ones, leads 0 to 60, T 1 and 2, every
divergence and reduction, masks (the all-masked batch included), V spanning several chunks and N several blocks.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from kernel_cases import peak_extra_mb, run_under_interpreter
from ssb_kernels import KDOptions, hidden_kd_loss
from ssb_kernels.hidden_kd import hidden_kd_eager
from ssb_kernels.hidden_stream import hidden_kd_streamed

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="run by test_interpreter_suite (subprocess)")
cpu_only = pytest.mark.skipif(INTERPRET, reason="CPU tests run in the parent process")
gpu_only = pytest.mark.skipif(INTERPRET or not CUDA, reason="needs a CUDA device")
DEV = "cuda" if CUDA and not INTERPRET else "cpu"
DIVS = ["forward_kl", "reverse_kl", "jsd"]
SMALL = {"chunk_size": 128, "row_block": 16}  # several chunks of V = 1003 and several row blocks of N = 40
LOSS_RTOL, DH_RTOL = 1e-4, {torch.float32: 1e-3, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}


def make_pair(n, h, v, lead_s, lead_t, same, seed, groups=None):
    """Student and teacher hidden states (n, h + 2G) and a head (v, h + 2G), fp32. The teacher is the student plus
    noise; G one-hot units per side (default G = n) let each row group lift its own top token: the student's leads
    by at least ``lead_s``, the teacher's by ``lead_t``, on the same token when ``same`` (a teacher that agrees:
    the self-distillation case) or on another one."""
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    tea = hid + 0.5 * torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h)
    n_g = n if groups is None else groups
    grp = torch.arange(n) % n_g
    top_s = torch.randint(0, v, (n_g,), generator=g)
    top_t = top_s if same else (top_s + 1 + torch.randint(0, v - 1, (n_g,), generator=g)) % v
    one = torch.nn.functional.one_hot(grp, n_g).double()
    zero = torch.zeros_like(one)
    w = torch.cat([w, torch.zeros(v, 2 * n_g, dtype=torch.float64)], 1)
    for base, top, lead, x in ((h, top_s, lead_s, hid), (h + n_g, top_t, lead_t, tea)):
        z = x @ w[:, :h].t()
        need = z.amax(1) + lead - z.gather(1, top[grp][:, None])[:, 0]
        bump = torch.full((n_g,), float("-inf"), dtype=torch.float64).scatter_reduce(0, grp, need, "amax")
        w[top, base + torch.arange(n_g)] = bump
    hid, tea = torch.cat([hid, one, zero], 1), torch.cat([tea, zero, one], 1)
    return hid.float(), w.float(), tea.float()


def run(fn, hid, w, tea, mask, opts, dtype):
    """Loss (reduction of ``opts``) and dh of ``fn`` in ``dtype``, with a non-uniform upstream gradient."""
    x = hid.to(dtype).detach().requires_grad_(True)
    loss = fn(x, w.to(dtype), tea.to(dtype), mask, opts)
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * up).sum().backward()
    return loss.detach().double(), x.grad


def chunked(h, w, t, m, o):
    return hidden_kd_streamed(h, w, t, m, o, "torch")


def triton(h, w, t, m, o):
    return hidden_kd_streamed(h, w, t, m, o, "triton")


def row_rel(got, truth):
    g, t = got.double().reshape(got.shape[0], -1), truth.reshape(truth.shape[0], -1)
    return (g - t).norm(dim=1) / t.norm(dim=1).clamp(min=1e-300)


def check(fn, inputs, opts, dtype, mask=None, report=None):
    """``fn`` in ``dtype`` vs eager float64 on the same rounded inputs: loss normwise, dh per row (module docstring)."""
    hid, w, tea = (x.to(DEV).to(dtype) for x in inputs)
    mask = None if mask is None else mask.to(DEV)
    t_loss, t_dh = run(hidden_kd_eager, hid.double(), w.double(), tea.double(), mask, opts, torch.float64)
    loss, dh = run(fn, hid, w, tea, mask, opts, dtype)
    assert dh.dtype == dtype and torch.isfinite(loss).all() and torch.isfinite(dh).all(), f"non-finite ({opts})"
    assert float(t_loss.norm()) > 0 and float(t_dh.norm()) > 0, "degenerate oracle"
    e_loss = float((loss - t_loss).norm() / t_loss.norm())
    live = t_dh.norm(dim=1) > 0
    assert bool((dh[~live] == 0).all()), "dh of a masked row is not exactly zero"
    rr = row_rel(dh, t_dh)
    limit = DH_RTOL[dtype] + (row_rel(t_dh.to(dtype), t_dh) if dtype != torch.float32 else 0.0)
    worst = float(rr[live].max())
    if report is not None:
        report.append((dtype, e_loss, worst))
    assert e_loss <= LOSS_RTOL, f"loss [{dtype}] rel err {e_loss:.2e} ({opts})"
    bad = int(torch.where(live, rr - limit, -1.0).argmax())
    assert bool((rr[live] <= (limit[live] if torch.is_tensor(limit) else limit)).all()), (
        f"dh [{dtype}] worst row {bad}: rel err {float(rr[bad]):.2e} ({opts})"
    )


# ---- chunked, fp32 and float64
@cpu_only
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize(
    "lead_s,lead_t,same,temperature",
    [(0.0, 0.0, True, 1.0), (20.0, 20.0, True, 2.0), (60.0, 60.0, True, 1.0), (60.0, 5.0, True, 2.0),
     (5.0, 60.0, True, 1.0), (30.0, 30.0, False, 1.0), (60.0, 60.0, False, 2.0)],
)  # fmt: skip
def test_chunked_matches_float64_in_the_regimes(lead_s, lead_t, same, temperature, divergence):
    inputs = make_pair(40, 24, 1003, lead_s, lead_t, same, 1)
    for red in ("none", "sum"):
        check(chunked, inputs, KDOptions(temperature, reduction=red, divergence=divergence, **SMALL), torch.float32)


@cpu_only
@pytest.mark.parametrize("divergence", DIVS)
def test_chunked_float64_equals_eager_float64(divergence):
    hid, w, tea = (x.double() for x in make_pair(9, 16, 777, 40.0, 40.0, True, 3))
    opts = KDOptions(2.0, reduction="none", divergence=divergence, chunk_size=100)
    ref = run(hidden_kd_eager, hid, w, tea, None, opts, torch.float64)
    got = run(chunked, hid, w, tea, None, opts, torch.float64)
    assert float((got[0] - ref[0]).norm() / ref[0].norm()) < 1e-12
    assert float(row_rel(got[1], ref[1]).max()) < 1e-10


@cpu_only
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masks_and_reductions_match_float64(reduction, divergence):
    mask = torch.arange(40) % 5 != 2  # 20% of the rows masked
    opts = KDOptions(2.0, reduction=reduction, divergence=divergence, **SMALL)
    check(chunked, make_pair(40, 24, 1003, 15.0, 10.0, True, 5), opts, torch.float32, mask=mask)


@cpu_only
@pytest.mark.parametrize("impl", ["eager", "chunked"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_batch_is_a_finite_zero_with_zero_grad(impl, reduction):
    hid, w, tea = make_pair(6, 8, 300, 20.0, 20.0, True, 0)
    x = hid.requires_grad_(True)
    loss = hidden_kd_loss(x, w, tea, mask=torch.zeros(6, dtype=torch.bool), reduction=reduction, impl=impl)
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(x.grad == 0) and torch.isfinite(loss).all()
    x = torch.zeros(0, 8 + 12, requires_grad=True)  # an empty batch
    loss = hidden_kd_loss(x, w, torch.zeros(0, 20), reduction=reduction, impl=impl)
    loss.sum().backward()
    assert float(loss.detach().sum()) == 0.0 and x.grad.shape == (0, 20)


@cpu_only
def test_auto_impl_and_validation():
    hid, w, tea = make_pair(4, 8, 300, 3.0, 3.0, False, 0)
    ref = hidden_kd_loss(hid, w, tea, impl="eager")
    assert torch.allclose(hidden_kd_loss(hid, w, tea), ref) and torch.allclose(
        hidden_kd_loss(hid, w, tea, impl="chunked"), ref
    )
    with pytest.raises(ValueError, match="frozen head"):
        hidden_kd_loss(hid, w.clone().requires_grad_(True), tea)
    with pytest.raises(ValueError, match="teacher_hidden must match"):
        hidden_kd_loss(hid, w, tea[:3])
    with pytest.raises(ValueError, match="mask must be"):
        hidden_kd_loss(hid, w, tea, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="beta"):
        hidden_kd_loss(hid, w, tea, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="NaN"):
        hidden_kd_loss(hid, w, tea.clone().fill_(float("nan")), impl="chunked")


@cpu_only
@pytest.mark.parametrize("divergence", DIVS)
def test_gemma_sized_vocab_chunked(divergence):
    inputs = make_pair(3, 8, 262_144, 30.0, 30.0, True, 7)
    check(chunked, inputs, KDOptions(1.0, reduction="sum", divergence=divergence, chunk_size=32_768), torch.float32)


def with_late_jump(inputs, rise: float):
    """A constant hidden unit whose head column adds ``rise`` to the last 200 columns' logits (student and teacher):
    the maxima and the argmax jump in a late chunk, so every earlier sum and accumulator row must be rescaled (by
    e^-rise: without it the early chunks would outweigh the rest by e^rise)."""
    hid, w, tea = inputs
    one = torch.ones(hid.shape[0], 1)
    w = torch.cat([w, torch.zeros(w.shape[0], 1)], 1)
    w[-200:, -1] = rise
    return torch.cat([hid, one], 1), w, torch.cat([tea, one], 1)


@cpu_only
@pytest.mark.parametrize("divergence", DIVS)
def test_late_jump_of_the_max_is_rescaled_chunked(divergence):
    inputs = with_late_jump(make_pair(40, 24, 1003, 10.0, 10.0, True, 2), 25.0)
    check(chunked, inputs, KDOptions(1.0, reduction="none", divergence=divergence, **SMALL), torch.float32)


# ---- Triton under the interpreter (a subprocess on CPU) and on CUDA
@pytest.mark.skipif(INTERPRET or CUDA, reason="already in the interpreter or on CUDA")
def test_interpreter_suite():
    """Run this file's Triton tests under TRITON_INTERPRET=1 in a fresh process (CPU CI)."""
    run_under_interpreter(__file__, timeout=1500)


# Each interpreter case costs ~15 s of CPU: a Latin square over (dtype, divergence) x regime, so every dtype meets
# every divergence and every regime (leads 60 / 20 / 0, same or different tokens, T = 1 / 2) once, in 9 cases.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REGIMES = [(60.0, True, 1.0), (20.0, False, 2.0), (0.0, True, 2.0)]
LATIN = [(*REGIMES[(i + j) % 3], div, dt) for i, dt in enumerate(DTYPES) for j, div in enumerate(DIVS)]


@interpreter_only
@pytest.mark.parametrize("lead,same,temperature,divergence,dtype", LATIN, ids=str)
def test_triton_every_dtype_matches_float64(lead, same, temperature, divergence, dtype):
    inputs = make_pair(40, 24, 1003, lead, lead, same, 1)
    check(triton, inputs, KDOptions(temperature, reduction="none", divergence=divergence, **SMALL), dtype)


# The late jump lifts the same 200 columns for student and teacher, so p ~ q over many tokens and G = sum p W - sum q W
# cancels between the two accumulator rows: bf16 E rounded once lost the gradient there (worst row 0.16-0.18
# relative); bf16 E is now split into its rounding and residue (triton_hidden.split_e). Every dtype meets it.
LATE = [(div, torch.float32) for div in DIVS] + [("forward_kl", torch.bfloat16), ("reverse_kl", torch.bfloat16)]


@interpreter_only
@pytest.mark.parametrize("divergence,dtype", LATE, ids=str)
def test_triton_late_jump_masks_and_mean(divergence, dtype):
    inputs = with_late_jump(make_pair(40, 24, 1003, 10.0, 5.0, True, 2), 25.0)
    mask = torch.arange(40) % 5 != 2
    check(triton, inputs, KDOptions(2.0, reduction="mean", divergence=divergence, **SMALL), dtype, mask=mask)


@interpreter_only
def test_triton_all_masked_is_zero():
    hid, w, tea = make_pair(6, 8, 300, 20.0, 20.0, True, 0)
    x = hid.requires_grad_(True)
    loss = hidden_kd_loss(x, w, tea, mask=torch.zeros(6, dtype=torch.bool), impl="triton")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(x.grad == 0)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("lead,same", [(20.0, True), (60.0, False)])
def test_triton_cuda_qwen_shapes(lead, same, divergence, dtype):
    # H = 2032 + 2 x 8 one-hot units = 2048; 8 groups of rows share their top tokens
    check(triton, qwen_pair(lead, same), KDOptions(2.0, reduction="none", divergence=divergence), dtype)


@functools.lru_cache(maxsize=2)
def qwen_pair(lead, same):
    return make_pair(2048, 2032, 151_936, lead, lead, same, 0, groups=8)


# ---- memory: the chunked path never holds an (N, V) tensor
N_MEM, H_MEM, V_MEM = 2048, 256, 151_936
MEM_SETUP = f"""
h = torch.randn({N_MEM}, {H_MEM}, generator=g).requires_grad_(True)
t = h.detach() + 0.3 * torch.randn({N_MEM}, {H_MEM}, generator=g)
w = torch.randn({V_MEM}, {H_MEM}, generator=g) * 0.1
"""


@pytest.mark.slow
@cpu_only
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunked_peak_memory_is_far_below_one_n_by_v_tensor(divergence):
    kw = f"temperature=2.0, impl='chunked', divergence={divergence!r}"
    call = f"ssb_kernels.hidden_kd_loss(h[rows], w, t[rows], {kw}).backward()"
    got = peak_extra_mb(MEM_SETUP, call)
    logits_mb = N_MEM * V_MEM * 4 / 2**20  # one fp32 (N, V) tensor: 1187 MB
    acc_mb = N_MEM * 2 * H_MEM * 4 / 2**20  # the (N, 2, H) fp32 accumulator kept for backward: 4 MB
    print(f"peak extra RSS: hidden KD chunked {got['mb']:.0f} MB; one (N, V) fp32 {logits_mb:.0f} MB")
    assert got["grad_finite"]
    assert got["mb"] < 0.1 * logits_mb and got["mb"] < 64 + 4 * acc_mb
