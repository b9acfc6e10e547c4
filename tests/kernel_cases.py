"""Shared sparse-KD test cases and the ground-truth oracle check (STYLE.md) for tests/test_kernels*.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
from ssb_kernels.options import KDOptions
from ssb_kernels.reference import sparse_kd_eager


@dataclass(frozen=True)
class Case:
    name: str
    n: int = 37
    h: int = 48
    v: int = 1001
    k: int = 7
    temperature: float = 1.0
    variant: str = "tail"
    reduction: str = "mean"
    mask_frac: float = 0.0  # fraction of rows masked
    pad: int = 0  # trailing -1 padding per row
    teacher_scale: float = 2.0  # teacher logit std (large = peaked)
    student_scale: float = 1.0  # multiplies hidden (large = far from teacher, tail ratio large)
    lse_given: bool = True
    weight_grad: bool = False
    divergence: str = "forward_kl"


CASES = [
    Case("odd"),
    Case("odd-T2-renorm-sum", temperature=2.0, variant="renorm", reduction="sum"),
    Case("k1", k=1),
    Case("kV", v=64, k=64, h=16),
    Case("kV-T2-derived", v=64, k=64, h=16, temperature=2.0, lse_given=False),
    Case("masked20-pad", mask_frac=0.2, pad=3, reduction="none"),
    Case("peaked-tail1e-6", teacher_scale=12.0, k=16),
    Case("far-student-T2", student_scale=8.0, temperature=2.0),
    Case("derived-lse-T2", lse_given=False, temperature=2.0, pad=2),
    Case("renorm-none-masked", variant="renorm", reduction="none", mask_frac=0.2, pad=1),
    Case("weight-grad", weight_grad=True, temperature=2.0, mask_frac=0.2),
    Case("weight-grad-renorm", weight_grad=True, variant="renorm", pad=2),
    Case("reverse-T2-masked-pad", temperature=2.0, mask_frac=0.2, pad=2, divergence="reverse_kl"),
    Case("reverse-peaked-kV", v=64, k=64, h=16, teacher_scale=12.0, divergence="reverse_kl", reduction="sum"),
    Case("reverse-far-wgrad", student_scale=8.0, weight_grad=True, divergence="reverse_kl", lse_given=False),
    Case("jsd-T2-none-pad", temperature=2.0, reduction="none", pad=3, divergence="jsd"),
    Case("jsd-peaked-wgrad", teacher_scale=12.0, k=16, weight_grad=True, divergence="jsd", mask_frac=0.2),
]


def make_case(case: Case, dtype: torch.dtype, seed: int = 0) -> dict:
    """Inputs for ``case`` in ``dtype`` (teacher values are exact full-vocabulary log-probs, c_T exact)."""
    g = torch.Generator().manual_seed(seed)
    n, h, v, k = case.n, case.h, case.v, case.k
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * case.student_scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * case.teacher_scale
    logp_t = torch.log_softmax(t, -1)  # (N, V) teacher at T = 1
    lp, ids = logp_t.topk(k, -1)
    if case.pad:
        ids[:, k - case.pad :] = -1
        lp[:, k - case.pad :] = 0.0  # value under padding is ignored
    mask = torch.rand(n, generator=g) >= case.mask_frac
    lse_t = torch.logsumexp(logp_t / case.temperature, -1)  # exact c_T over the full vocabulary
    return {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "topk_ids": ids,
        "topk_logprobs": lp.float() if dtype != torch.float64 else lp,
        "lse_t": (lse_t.float() if dtype != torch.float64 else lse_t) if case.lse_given else None,
        "mask": mask if case.mask_frac else None,
    }


def opts_of(case: Case, **kw) -> KDOptions:
    return KDOptions(temperature=case.temperature, variant=case.variant, reduction=case.reduction,
                     divergence=case.divergence, **kw)  # fmt: skip


def loss_and_grads(fn, x: dict, case: Case, dtype: torch.dtype) -> dict:
    """Run ``fn(hidden, weight, ids, lp, lse_t, mask)``, backward with a non-trivial upstream grad."""
    hidden = x["hidden"].to(dtype).detach().requires_grad_(True)
    weight = x["weight"].to(dtype).detach().requires_grad_(case.weight_grad)
    lp = x["topk_logprobs"] if dtype == torch.float64 else x["topk_logprobs"].float()
    lse = x["lse_t"]
    if lse is not None:
        lse = lse if dtype == torch.float64 else lse.float()
    loss = fn(hidden, weight, x["topk_ids"], lp, lse, x["mask"])
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)  # "not the last layer"
    (loss * up).sum().backward()
    out = {"loss": loss.detach().double(), "hidden.grad": hidden.grad.double()}
    if case.weight_grad:
        out["weight.grad"] = weight.grad.double()
    else:
        assert weight.grad is None
    return out


def eager_fn(case: Case):
    return lambda h, w, i, lp, lse, m: sparse_kd_eager(h, w, i, lp, lse, m, opts_of(case))


def assert_oracle(case: Case, x: dict, fn, dtype: torch.dtype, eps: float = 1e-5) -> None:
    """|impl - truth| <= |eager_same_dtype - truth| + eps, elementwise; truth = eager in float64 on the
    same (dtype-rounded) inputs. Prints the worst element on failure."""
    rounded = dict(x, hidden=x["hidden"].to(dtype).double(), weight=x["weight"].to(dtype).double())
    if x["lse_t"] is not None:
        rounded["lse_t"] = x["lse_t"].double()
    rounded["topk_logprobs"] = x["topk_logprobs"].double()
    truth = loss_and_grads(eager_fn(case), rounded, case, torch.float64)
    ref = loss_and_grads(eager_fn(case), x, case, dtype)
    got = loss_and_grads(fn, x, case, dtype)
    for key, t in truth.items():
        scale = float(t.abs().max()) if t.numel() else 1.0
        err, allowed = (got[key] - t).abs(), (ref[key] - t).abs() + eps * max(1.0, scale)
        assert torch.isfinite(got[key]).all(), f"{case.name} {key}: non-finite values"
        bad = err - allowed
        if bad.numel() and float(bad.max()) > 0:
            i = int(bad.reshape(-1).argmax())
            raise AssertionError(
                f"{case.name} {key} [{dtype}]: worst flat index {i}: got {float(got[key].reshape(-1)[i]):.8g}, "
                f"truth {float(t.reshape(-1)[i]):.8g}, eager-{dtype} {float(ref[key].reshape(-1)[i]):.8g}"
            )


# ---- the regimes real models produce (issue 14): shared by tests/test_kernels_regimes.py and the Triton tests
RTOL = 1e-4  # the target for fp32 on CPU, loss and dh


LOSSES = ["tail", "renorm", "reverse_kl", "jsd"]  # forward KL's two variants, then the other divergences (tail)


def regime_opts(temperature, loss, reduction, **kw) -> KDOptions:
    """KDOptions for a name in LOSSES: "tail" / "renorm" are forward KL, the others use the tail variant."""
    if loss in ("tail", "renorm"):
        return KDOptions(temperature, loss, reduction, **kw)
    return KDOptions(temperature, "tail", reduction, divergence=loss, **kw)


def make_regime(n, h, v, k, lead, tail, temperature, seed, groups=None):
    """Student hidden/head whose top logit leads the rest by ``lead``; a teacher with tail mass ``tail``.

    Returns fp32 tensors: hidden (n, h + G), weight (v, h + G), ids (n, k), logprobs (n, k), exact c_T (n,).
    The teacher is a full-vocabulary distribution, so c_T = LSE_v(l_v / T) is exact (computed in fp64).
    G = ``groups`` one-hot hidden units (default n: one per row); rows r and r + G share a top token, which
    leads by at least ``lead`` in each of them.
    """
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h)
    n_g = n if groups is None else groups
    grp = torch.arange(n) % n_g
    top = torch.randint(0, v, (n_g,), generator=g)[grp]
    z = hid @ w.t()  # (n, v)
    # one extra hidden unit per group (one-hot) lets rows raise their own top token: W[top_g, h + g] = bump_g
    hid = torch.cat([hid, torch.nn.functional.one_hot(grp, n_g).double()], 1)
    w = torch.cat([w, torch.zeros(v, n_g, dtype=torch.float64)], 1)
    need = z.amax(1) + lead - z.gather(1, top[:, None])[:, 0]  # (n,) so that z[r, top_r] >= max_r + lead
    bump = torch.full((n_g,), float("-inf"), dtype=torch.float64).scatter_reduce(0, grp, need, "amax")
    w[top[:n_g], h + torch.arange(n_g)] = bump
    # teacher: K holds the student's top token plus k-1 random others; full-vocab log-probs with tail mass `tail`
    rows = []
    for r in range(n):
        perm = torch.randperm(v, generator=g)
        perm = torch.cat([top[r : r + 1], perm[perm != top[r]]])
        rows.append(perm[:k])
    ids = torch.stack(rows)  # (n, k) distinct per row, top token first
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0
    in_k = torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids, True)
    lk = torch.log_softmax(t.masked_fill(~in_k, float("-inf")), -1)
    loff = torch.log_softmax(t.masked_fill(in_k, float("-inf")), -1)
    full = torch.where(in_k, lk + math.log1p(-tail), loff + (math.log(tail) if tail > 0 else float("-inf")))
    c = torch.logsumexp(full / temperature, -1)
    return (hid.float(), w.float(), ids, full.gather(1, ids).float(), c.float())


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def run(fn, hid, w, ids, lp, c, opts):
    x = hid.clone().requires_grad_(True)
    loss = fn(x, w, ids, lp, c, None, opts)
    loss.sum().backward()
    return loss.detach(), x.grad


def run_under_interpreter(test_file: str, timeout: int = 900) -> None:
    """Re-run ``test_file``'s Triton tests in a fresh process with TRITON_INTERPRET=1 (it must be set before
    triton is imported, so the parent pytest process never imports triton in interpreter mode)."""
    import pytest

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "not interpreter_suite"],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-1000:]


PEAK_RSS = """
import ctypes, gc, json, torch, ssb_kernels
def status(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key)) / 1024
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
{setup}
def call(rows):
    {call}
call(slice(0, 8))  # warm-up: library init is not the call's memory
h.grad = None
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
before = status("VmRSS:")
call(slice(None))
print(json.dumps({{"mb": status("VmHWM:") - before, "grad_finite": bool(torch.isfinite(h.grad).all())}}))
"""


def peak_extra_mb(setup: str, call: str, timeout: int = 600) -> dict:
    """Peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS before one forward+backward, in a fresh
    process with 2 threads after a warm-up on 8 rows; ``setup`` defines ``h`` (requires grad) and the other inputs,
    ``call`` is one statement of ``rows`` (a slice of the rows) that runs the loss and its backward.
    Returns {"mb", "grad_finite"}."""
    script = PEAK_RSS.format(setup=setup, call=call)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
