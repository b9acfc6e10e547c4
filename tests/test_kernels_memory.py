"""Peak extra memory of sparse KD forward+backward at N=2048, V=151936 (Qwen2.5 vocabulary), H=256, k=64.

Each implementation runs once in a fresh process (2 threads) after a warm-up on 8 rows (library init);
the figure is the peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS at the start of the
call. Eager holds several (N, V) fp32 tensors (>= 1.2 GB each at this size); the chunked path holds one
(N, chunk) buffer plus O(N H) state, so its peak must be a small fraction of eager's and far below a
single (N, V) logits tensor.
"""

from __future__ import annotations

import pytest
from kernel_cases import peak_extra_mb

N, H, V, K = 2048, 256, 151936, 64
SETUP = f"""
h = torch.randn({N}, {H}, generator=g).requires_grad_(True)
w = torch.randn({V}, {H}, generator=g) * 0.1
ids = (torch.randint(0, {V}, ({N}, 1), generator=g) + torch.arange({K}) * ({V} // {K})) % {V}
lp = torch.log_softmax(torch.randn({N}, {K}, generator=g), -1) - 0.1
"""


def _peak_mb(impl: str) -> dict:
    call = f"ssb_kernels.sparse_kd_loss(h[rows], w, ids[rows], lp[rows], temperature=2.0, impl={impl!r}).backward()"
    return peak_extra_mb(SETUP, call, timeout=300)


@pytest.mark.slow
def test_chunked_peak_memory_does_not_scale_with_n_times_v():
    logits_mb = N * V * 4 / 2**20  # one fp32 (N, V) tensor: 1187 MB
    chunked, eager = _peak_mb("chunked"), _peak_mb("eager")
    print(f"peak extra RSS: chunked {chunked['mb']:.0f} MB, eager {eager['mb']:.0f} MB, one (N, V) {logits_mb:.0f} MB")
    assert chunked["grad_finite"] and eager["grad_finite"]
    assert eager["mb"] > logits_mb  # the measurement sees eager's full logits
    assert chunked["mb"] < eager["mb"] / 10
    assert chunked["mb"] < 0.25 * logits_mb
