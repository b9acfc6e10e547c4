"""KD and CE from one pass over the head (`sparse_kd_ce_loss`) against the two separate losses in float64.

The reference is the sum of what the trainer computed before: `sparse_kd_loss` for KD and `sparse_kd_loss`
against a one-hot teacher (k = 1, log-prob 0, c_1 = 0, T = 1) for CE, both eager in float64. Losses and
gradients (dh, and dW when the head trains) must agree at 1e-4 normwise relative, with the two losses weighted
differently so a swapped or dropped term cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import RTOL, make_regime, rel
from ssb_kernels import sparse_kd_ce_loss, sparse_kd_loss

N, V = 11, 301


def labels_for(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Every label kind: the student's top token (K's first id), another K id, an off-K id, ignored (-1)."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, V, (N,), generator=g)
    lab[0], lab[1], lab[2] = ids[0, 0], ids[1, -1], -1
    lab[3] = next(t for t in range(V) if t not in ids[3].tolist())
    return lab


def losses(fn, inputs, labels, mask, opts, dtype, weight_grad):
    hid, w, ids, lp, c = inputs
    h = hid.to(dtype).detach().requires_grad_(True)
    wt = w.to(dtype).detach().requires_grad_(weight_grad)
    kd, ce = fn(h, wt, ids, lp.to(dtype), labels, c.to(dtype), mask, opts)
    (0.7 * kd.sum() + 1.3 * ce.sum()).backward()  # different weights: a swapped or dropped term shows
    return [kd.detach(), ce.detach(), h.grad] + ([wt.grad] if weight_grad else [])


def separate_eager(h, w, ids, lp, labels, c, mask, opts):
    kw = {"mask": mask, "variant": opts["variant"], "reduction": opts["reduction"], "impl": "eager"}
    kd = sparse_kd_loss(h, w, ids, lp, lse_t=c, temperature=opts["temperature"],
                        divergence=opts.get("divergence", "forward_kl"), **kw)  # fmt: skip
    zeros = torch.zeros(h.shape[0], 1, dtype=lp.dtype)
    ce = sparse_kd_loss(h, w, labels[:, None], zeros, lse_t=zeros[:, 0], temperature=1.0, **{**kw, "variant": "tail"})
    return kd, ce


def fused(h, w, ids, lp, labels, c, mask, opts):
    return sparse_kd_ce_loss(h, w, ids, lp, labels, lse_t=c, mask=mask, impl="chunked", **opts)


@pytest.mark.parametrize(
    "lead,tail,temperature,k,variant,reduction,weight_grad",
    [
        (0.0, 0.05, 2.0, 5, "tail", "sum", False),
        (8.6, 0.5, 1.0, 16, "renorm", "mean", True),
        (30.0, 0.4, 1.0, 16, "tail", "mean", False),
        (60.0, 0.0, 2.0, 1, "tail", "none", True),
        (45.0, 1e-6, 2.0, 5, "renorm", "sum", False),
        (20.0, 1e-8, 2.0, 16, "reverse_kl", "mean", True),
        (0.0, 0.4, 1.0, 5, "reverse_kl", "none", False),
        (30.0, 0.05, 2.0, 5, "jsd", "sum", True),
    ],
)
def test_one_pass_matches_the_two_losses(lead, tail, temperature, k, variant, reduction, weight_grad):
    inputs = make_regime(N, 16, V, k, lead, tail, temperature, 2)
    labels = labels_for(inputs[2], 3)
    mask = torch.ones(N, dtype=torch.bool)
    mask[4] = False
    opts = {"temperature": temperature, "variant": variant, "reduction": reduction}
    if variant in ("reverse_kl", "jsd"):  # the other divergences take the tail variant
        opts.update(variant="tail", divergence=variant)
    truth = losses(separate_eager, inputs, labels, mask, opts, torch.float64, weight_grad)
    got = losses(fused, inputs, labels, mask, opts, torch.float32, weight_grad)
    for name, g, t in zip(("kd", "ce", "dh", "dW"), got, truth):
        assert float(t.norm()) > 0 and torch.isfinite(g).all(), f"{name}: degenerate truth or non-finite result"
        assert rel(g, t) <= RTOL, f"{name}: normwise rel err {rel(g, t):.2e} > {RTOL}"


def test_one_pass_streams_the_head_once(monkeypatch):
    import ssb_kernels.sparse_kd_ce as kd_ce

    calls = []
    real = kd_ce.stream
    monkeypatch.setattr(kd_ce, "stream", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    hid, w, ids, lp, c = make_regime(N, 16, V, 5, 3.0, 0.1, 2.0, 0)
    h = hid.requires_grad_(True)
    kd, ce = sparse_kd_ce_loss(h, w, ids, lp, labels_for(ids, 0), lse_t=c, temperature=2.0, impl="chunked")
    (kd + ce).backward()
    assert calls == [(0.5, 1.0)]  # one pass, both temperatures off the same chunk GEMM


def test_all_ignored_is_zero_and_bad_labels_are_refused():
    hid, w, ids, lp, c = make_regime(N, 16, V, 5, 3.0, 0.1, 1.0, 0)
    h = hid.requires_grad_(True)
    mask = torch.zeros(N, dtype=torch.bool)
    kd, ce = sparse_kd_ce_loss(h, w, ids, lp, labels_for(ids, 0), lse_t=c, mask=mask, impl="chunked")
    (kd + ce).backward()
    assert float(kd.detach()) == 0.0 and float(ce.detach()) == 0.0 and torch.all(h.grad == 0)
    with pytest.raises(ValueError, match="labels must be an int32/int64"):
        sparse_kd_ce_loss(hid, w, ids, lp, torch.zeros(N + 1, dtype=torch.long), impl="chunked")
    with pytest.raises(ValueError, match="labels must lie in"):
        sparse_kd_ce_loss(hid, w, ids, lp, torch.full((N,), V), impl="chunked")
