"""Reverse KL and JSD (issue 18) against their definitions, written out here on the full softmax in float64.

The kernels compute the divergences from the student's log p on K and its off-K mass (SPEC section 2b); these
tests compute them independently: the whole (N, V) student distribution at T, its outcome masses p_K and
p_t = sum of the off-K probabilities, the teacher's q_K = exp(l_K / T - c_T) and q_t = 1 - sum q_K, then each
divergence by its formula. Gradients are checked by finite differences (gradcheck), and the regime and oracle
suites (tests/test_kernels_regimes.py, tests/kernel_cases.py, the Triton tests) run every divergence too.
"""

from __future__ import annotations

import math

import pytest
import torch
from ssb_kernels import KDOptions, sparse_kd_ce_loss, sparse_kd_loss
from ssb_kernels.rowmath import QT_FLOOR
from ssb_kernels.streamed_kd import sparse_kd_chunked

DIVS = ("forward_kl", "reverse_kl", "jsd")


def setup(n=9, h=12, v=97, k=6, seed=0, teacher_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    full = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * teacher_scale, -1)  # T = 1
    lp, ids = full.topk(k, -1)
    return hid, w, ids, lp, full


def definition(hid, w, ids, lp, c, temperature, divergence, beta=0.5, qt_override=None):
    """Per-row divergence over the outcomes (K ids, tail) from the full student softmax, float64, times T^2."""
    p_full = torch.softmax(hid @ w.t() / temperature, -1)  # (N, V)
    p_k = p_full.gather(1, ids)
    p_t = (1.0 - p_k.sum(-1)).clamp(min=0.0)  # K is small here and the student not confident: no cancellation
    p_t = torch.where((ids >= 0).sum(-1) >= w.shape[0], 0.0, p_t)  # K covers V: no tail outcome, not residue
    q_k = torch.exp(lp / temperature - c[:, None])
    q_t = (1.0 - q_k.sum(-1)).clamp(min=0.0) if qt_override is None else qt_override
    p = torch.cat([p_k, p_t[:, None]], 1)
    q = torch.cat([q_k, q_t[:, None]], 1)

    def kl(a, b):  # sum a log(a / b), 0 log 0 = 0
        return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)

    if divergence == "forward_kl":
        out = kl(q, p)
    elif divergence == "reverse_kl":
        out = kl(p, q)
    else:
        m = beta * q + (1 - beta) * p
        out = beta * kl(q, m) + (1 - beta) * kl(p, m)
    return out * temperature**2


@pytest.mark.parametrize("impl", ["eager", "chunked"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVS)
def test_each_divergence_equals_its_definition(divergence, temperature, impl):
    hid, w, ids, lp, full = setup()
    c = torch.logsumexp(full / temperature, -1)
    for beta in (0.5, 0.1) if divergence == "jsd" else (0.5,):
        got = sparse_kd_loss(hid, w, ids, lp, lse_t=c, temperature=temperature, reduction="none", impl=impl,
                             divergence=divergence, beta=beta)  # fmt: skip
        want = definition(hid, w, ids, lp, c, temperature, divergence, beta)
        assert float(want.min()) > 1e-3  # the rows are far from a match: a zero loss cannot pass
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_gradients_match_finite_differences(divergence):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    w = (torch.randn(23, 6, dtype=torch.float64, generator=g) * 0.5).requires_grad_(True)
    ids = torch.stack([torch.randperm(23, generator=g)[:5] for _ in range(4)])
    ids[1, 3:] = -1
    full = torch.log_softmax(torch.randn(4, 23, dtype=torch.float64, generator=g), -1)
    lp = full.gather(1, ids.clamp(min=0))
    mask = torch.tensor([True, True, False, True])
    for reduction, lse_t, beta in [("mean", None, 0.5), ("none", torch.logsumexp(full / 2.0, -1), 0.3)]:
        o = KDOptions(temperature=2.0, reduction=reduction, chunk_size=7, divergence=divergence, beta=beta)

        def fn(a, b, o=o, lse_t=lse_t):
            return sparse_kd_chunked(a, b, ids, lp, lse_t, mask, o)

        assert torch.autograd.gradcheck(fn, (h, w)), (divergence, reduction)


def test_reverse_kl_with_no_teacher_tail_uses_the_floor_and_a_resolved_tail_is_exact():
    hid, w, ids, _, _ = setup(n=4, k=3)
    # K mass exactly 1 in fp64 (1 + 2e-22 rounds to 1): q_t computes to 0 while the student keeps p_t > 0
    lp0 = torch.tensor([[0.0, -50.0, -60.0]] * 4, dtype=torch.float64)
    c0 = torch.zeros(4, dtype=torch.float64)
    h = hid.clone().requires_grad_(True)
    loss = sparse_kd_loss(h, w, ids, lp0, lse_t=c0, reduction="none", impl="chunked", divergence="reverse_kl")
    loss.sum().backward()
    want = definition(hid, w, ids, lp0, c0, 1.0, "reverse_kl", qt_override=torch.full((4,), QT_FLOOR))
    torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=0)
    assert torch.isfinite(h.grad).all() and float(h.grad.norm()) > 0
    # off K the gradient is a * p_v / p_t with a = p_t (log(p_t / q_t) - L) > 0 here: descent lowers the tail
    p_t = 1 - torch.softmax(hid @ w.t(), -1).gather(1, ids).sum(-1)
    assert bool((p_t * (p_t.log() - math.log(QT_FLOOR)) > 0).all())
    eager = sparse_kd_loss(hid, w, ids, lp0, lse_t=c0, reduction="none", impl="eager", divergence="reverse_kl")
    torch.testing.assert_close(eager, want, rtol=1e-10, atol=0)
    # a tail the store resolves (1e-8, below the floor's 6e-8) is used as is, in fp32 inputs as well
    tail = 1e-8
    lp = torch.tensor([[math.log1p(-tail) + math.log(0.7), math.log1p(-tail) + math.log(0.3)]] * 4)
    c = torch.zeros(4)
    got = sparse_kd_loss(hid.float(), w.float(), ids[:, :2], lp, lse_t=c, reduction="none", impl="chunked",
                         divergence="reverse_kl")  # fmt: skip
    want = definition(hid, w, ids[:, :2], lp.double(), c.double(), 1.0, "reverse_kl")
    assert float((want - definition(hid, w, ids[:, :2], lp.double(), c.double(), 1.0, "reverse_kl",
                                    qt_override=torch.full((4,), QT_FLOOR))).abs().min()) > 1e-3  # fmt: skip
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_jsd_and_forward_kl_are_finite_without_a_teacher_tail():
    hid, w, ids, _, _ = setup(n=4, k=3)
    lp0 = torch.tensor([[0.0, -50.0, -60.0]] * 4, dtype=torch.float64)
    c0 = torch.zeros(4, dtype=torch.float64)
    for div in ("jsd", "forward_kl"):
        got = sparse_kd_loss(hid, w, ids, lp0, lse_t=c0, reduction="none", impl="chunked", divergence=div)
        want = definition(hid, w, ids, lp0, c0, 1.0, div, qt_override=torch.zeros(4, dtype=torch.float64))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("divergence", DIVS)
def test_k_covering_the_vocabulary_has_no_tail_outcome(divergence):
    hid, w, ids, lp, full = setup(n=5, v=20, k=20)
    c = torch.logsumexp(full / 2.0, -1)
    for impl in ("eager", "chunked"):
        got = sparse_kd_loss(hid, w, ids, lp, lse_t=c, temperature=2.0, reduction="none", impl=impl,
                             divergence=divergence)  # fmt: skip
        want = definition(hid, w, ids, lp, c, 2.0, divergence, qt_override=torch.zeros(5, dtype=torch.float64))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"divergence": "kl"}, "divergence"), ({"divergence": "reverse_kl", "variant": "renorm"}, "renorm"),
     ({"divergence": "jsd", "beta": 0.0}, "beta"), ({"divergence": "jsd", "beta": 1.0}, "beta")],
)  # fmt: skip
def test_divergence_option_errors(kwargs, match):
    hid, w, ids, lp, _ = setup(n=2)
    with pytest.raises(ValueError, match=match):
        sparse_kd_loss(hid, w, ids, lp, **kwargs)
    with pytest.raises(ValueError, match=match):
        sparse_kd_ce_loss(hid, w, ids, lp, torch.zeros(2, dtype=torch.long), **kwargs)
