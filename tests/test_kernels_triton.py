"""Triton kernels against the float64 oracle: under TRITON_INTERPRET=1 on CPU (small shapes, fp32/fp16), and
on CUDA (bf16, realistic shapes; marked gpu).

TRITON_INTERPRET must be set before triton is imported, so on CPU `test_interpreter_suite` re-runs this file
in a subprocess with the variable set; the parent pytest process never imports triton in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import Case, assert_oracle, make_case
from ssb_kernels import KDOptions, sparse_kd_loss
from ssb_kernels.options import TopkOptions
from ssb_kernels.reference import topk_logprobs_eager

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not (INTERPRET or CUDA), reason="run by test_interpreter_suite (subprocess)")
DEV = "cuda" if CUDA and not INTERPRET else "cpu"

INTERP_CASES = [
    Case("odd", n=37, h=48, v=301, k=7),
    Case("k1-T2", n=20, h=16, v=130, k=1, temperature=2.0),
    Case("kV-derived", n=6, h=16, v=64, k=64, lse_given=False),
    Case("masked-pad-none", n=20, h=32, v=200, k=6, mask_frac=0.2, pad=2, reduction="none"),
    Case("peaked-renorm-sum", n=16, h=16, v=150, k=9, teacher_scale=12.0, variant="renorm", reduction="sum"),
    Case("far-wgrad-T2", n=20, h=16, v=130, k=5, student_scale=6.0, temperature=2.0, weight_grad=True, pad=1),
]


def _on(x: dict, dev: str) -> dict:
    return {key: (val.to(dev) if isinstance(val, torch.Tensor) else val) for key, val in x.items()}


def triton_fn(case: Case):
    from ssb_kernels.triton_sparse_kd import sparse_kd_triton

    o = KDOptions(temperature=case.temperature, variant=case.variant, reduction=case.reduction)
    return lambda h, w, i, lp, lse, m: sparse_kd_triton(h, w, i, lp, lse, m, o)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", INTERP_CASES, ids=[c.name for c in INTERP_CASES])
def test_triton_sparse_kd_matches_oracle(case, dtype):
    # the backward feeds g = w a p to the tensor-core dot in the input dtype (as Cut Cross-Entropy does), so
    # half-precision grads may differ from eager's by about one output ulp at the largest magnitude
    eps = 1e-5 if dtype == torch.float32 else 2.0**-11
    assert_oracle(case, make_case(case, dtype), triton_fn(case), dtype, eps=eps)


@needs_triton
@pytest.mark.parametrize(
    "n,h,v,k,temps", [(37, 48, 301, 7, (1.0, 2.0)), (5, 16, 64, 64, (0.5,)), (9, 32, 200, 1, (1.0,))]
)
def test_triton_topk_matches_float64(n, h, v, k, temps):
    from ssb_kernels.triton_topk import topk_logprobs_triton

    g = torch.Generator().manual_seed(k)
    hid, w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 3
    truth = topk_logprobs_eager(hid.double(), w.double(), TopkOptions(k=k, temperatures=temps))
    ids, lp, lse = topk_logprobs_triton(hid.to(DEV), w.to(DEV), TopkOptions(k=k, temperatures=temps))
    assert torch.equal(ids.cpu(), truth[0])
    torch.testing.assert_close(lp.cpu().double(), truth[1], rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.cpu().double(), truth[2], rtol=0, atol=2e-5)


@needs_triton
def test_triton_all_masked_is_zero():
    x = make_case(Case("m", n=8, h=16, v=64, k=4), torch.float32)
    h = x["hidden"].to(DEV).requires_grad_(True)
    mask = torch.zeros(8, dtype=torch.bool, device=DEV)
    loss = sparse_kd_loss(h, x["weight"].to(DEV), x["topk_ids"].to(DEV), x["topk_logprobs"].to(DEV), mask=mask,
                          impl="triton")  # fmt: skip
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(h.grad == 0)


@needs_triton
def test_triton_empty_batch():
    from ssb_kernels import topk_logprobs

    h, w = torch.randn(0, 16, device=DEV, requires_grad=True), torch.randn(40, 16, device=DEV)
    loss = sparse_kd_loss(h, w, torch.zeros(0, 4, dtype=torch.long, device=DEV), torch.zeros(0, 4, device=DEV),
                          impl="triton")  # fmt: skip
    loss.backward()
    assert float(loss.detach()) == 0.0 and h.grad.shape == (0, 16)
    assert topk_logprobs(h.detach(), w, 3, impl="triton")[0].shape == (0, 3)


@pytest.mark.skipif(INTERPRET or CUDA, reason="already in the interpreter or on CUDA")
def test_interpreter_suite():
    """Run this file's Triton tests under TRITON_INTERPRET=1 in a fresh process (CPU CI)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = Path(__file__)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k", "not interpreter_suite"],
        cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-1000:]


GPU_CASES = [
    Case("qwen-like", n=1000, h=256, v=32000, k=64, temperature=2.0, mask_frac=0.2, pad=3),
    Case("qwen-like-wgrad", n=300, h=128, v=5003, k=16, weight_grad=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
def test_triton_cuda_matches_oracle(case, dtype):
    """bf16 (never under the interpreter: tl.dot on bf16 is wrong there) on realistic shapes; oracle on CPU."""
    fn = triton_fn(case)

    def on_cuda(h, w, i, lp, lse, m):
        hc, wc = h.detach().cuda().requires_grad_(h.requires_grad), w.detach().cuda().requires_grad_(w.requires_grad)
        out = fn(hc, wc, i.cuda(), lp.cuda(), None if lse is None else lse.cuda(), None if m is None else m.cuda())
        return _CudaBridge.apply(out, h, w, hc, wc)

    assert_oracle(case, make_case(case, dtype), on_cuda, dtype, eps=1e-3 if dtype == torch.bfloat16 else 1e-4)


class _CudaBridge(torch.autograd.Function):
    """Moves a CUDA loss to CPU and routes CPU upstream grads through the CUDA graph (test plumbing)."""

    @staticmethod
    def forward(ctx, out, h, w, hc, wc):
        ctx.save_for_backward(out, hc, wc)
        ctx.graph_out = out
        return out.detach().cpu()

    @staticmethod
    def backward(ctx, g):
        out, hc, wc = ctx.saved_tensors
        inputs = [t for t in (hc, wc) if t.requires_grad]
        grads = iter(torch.autograd.grad(ctx.graph_out, inputs, g.cuda()))
        gh = next(grads).cpu() if hc.requires_grad else None
        gw = next(grads).cpu() if wc.requires_grad else None
        return None, gh, gw, None, None
