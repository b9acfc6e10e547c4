"""Sparse top-k KD loss, forward + backward (grad to hidden, frozen head), ours across shapes.

Run: ``pytest bench/test_bench_kd.py [--quick]`` (GPU: ``bash bench/gpu.sh``). Providers (bench/kd_providers.py)
share one setup factory (bench/shapes.py): ``eager`` (full logits), ``chunked`` (streaming PyTorch), ``triton``
(CUDA, or CPU under TRITON_INTERPRET=1 on the tiny shape only), ``hidden-*`` (``hidden_kd_loss``: the exact
teacher from its hidden states, the same three impls) and ``floor``, the bare GEMMs of chunked's 4NHV
FLOPs (vocabulary chunks of 4096). The peers run side by side in their own processes: ``make bench-peers``
(bench/peers.py). Figures: tokens/s, TFLOP/s at 4NHV, fraction of peak (CUDA), peak extra memory (CUDA
allocator; on CPU the peak RSS growth of a fresh process, ``bench/peers.py --one``), first-call time apart;
they go to ``bench/results/kd.json`` (``bench_record``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from kd_providers import PEERS, PROVIDERS, figures, make_fn, skip_reason
from measure import run_child
from shapes import INTERPRETER_SHAPES, KDShape, make_kd_inputs, shapes_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cases():
    shapes = shapes_for(DEVICE, quick=False) + (INTERPRETER_SHAPES if DEVICE.type != "cuda" else ())
    # the peers are measured side by side in their own processes by bench/peers.py (make bench-peers)
    return [pytest.param(s, p, id=f"{s.name}-{p}") for s in shapes for p in PROVIDERS if p not in PEERS]


@pytest.mark.parametrize("shape,provider", _cases())
def test_bench_sparse_kd(benchmark, bench_record, quick, shape: KDShape, provider: str):
    if shape not in shapes_for(DEVICE, quick) and shape not in INTERPRETER_SHAPES:
        pytest.skip("not in the --quick shape set")
    reason = skip_reason(shape, provider, DEVICE)
    if reason:
        pytest.skip(reason)
    if DEVICE.type == "cpu":
        torch.set_num_threads(2)
    x = make_kd_inputs(shape, DEVICE)
    fn = make_fn(x, provider)
    t0 = time.perf_counter()
    fn()  # warm-up: Triton compile happens here and is reported separately (first_call_s)
    first_s = time.perf_counter() - t0
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    big = shape.n * shape.v >= 2048 * 100_000
    rounds = (1 if quick or big else 3) if DEVICE.type == "cpu" else (3 if quick else 10)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    if DEVICE.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _peak_extra_mib(shape, provider) if provider in ("eager", "chunked", "hidden-chunked") else None
    info = figures(shape, provider, benchmark.stats.stats.min, first_s, peak)
    figs = {
        k: info.get(k) for k in ("tokens_per_s", "tflops_4nhv", "fraction_of_peak", "peak_extra_mib", "first_call_s")
    }
    figs["time_min_s"] = benchmark.stats.stats.min
    params = {k: info[k] for k in ("shape", "provider", "n", "h", "v", "k", "dtype") if k in info}
    params.update(seq_len=shape.n, triton_interpret=info.get("triton_interpret"))
    bench_record("kd", f"{shape.name}/{provider}/{DEVICE.type}", figs, params, device=DEVICE, benchmark=benchmark)


def _peak_extra_mib(shape: KDShape, provider: str) -> float:
    """Peak RSS growth of one call in a fresh process (bench/peers.py child mode), inputs excluded."""
    args = ["--one", provider, str(shape.n), str(shape.h), str(shape.v), "--t", str(shape.temperature),
            "--k", str(shape.k)]  # fmt: skip
    return run_child(Path(__file__).parent / "peers.py", args, timeout=300)["peak_extra_mib"]
