"""Rollout throughput on the toy model: vLLM vs batched HF vs the reference style (HF, one sequence at a time).

Run: ``flock /tmp/ssb-vllm.lock pytest bench/test_bench_rollout.py [--quick]``. The workload is the rollout
stage's: K=4 samples per toy problem at the paper's T=0.8, top-k 50, through the student chat view. Providers:
``vllm`` (``ssb.engines`` VLLMEngine, every request in one call), ``hf`` (``ssb.engines`` HFEngine, all rows
in one left-padded batch), ``hf-reference`` (plain ``model.generate`` per sample, as the SSB reference code
does). Figure: generated tokens/s over one timed pass (vLLM start-up reported apart as ``startup_s``), in
``bench/results/rollout.json``; ``vllm`` also carries ``speedup_vs_reference`` (issue target: >= 5).
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from measure import peak_memory

from ssb.config import EngineConfig, ModelConfig
from ssb.core.prompts import end_of_turn_id, prompt_ids, student_messages
from ssb.engines import Sampling, make_engine, vllm_lock

K = 4
RESULTS: dict[str, float] = {}  # provider -> tokens/s, for the speed-up figure


@pytest.fixture(scope="module")
def workload(quick):
    from ssb.toy.world import asset_path, problems

    path = asset_path()
    if not (path / "config.json").exists():
        pytest.skip(f"toy asset not built at {path}")
    n = 8 if quick else 32
    convs = [student_messages(p.question()) for p in problems("train", n, 0)]
    sampling = Sampling(n=K, temperature=0.8, top_k=50, top_p=1.0, max_new_tokens=256, seed=0)
    return path, convs, sampling


def _reference(model, tokenizer, convs, sampling) -> int:
    """One ``generate`` call per sample with HF's own sampling: how the reference code produced rollouts."""
    eot = end_of_turn_id(tokenizer)
    tokens = 0
    torch.manual_seed(sampling.seed)
    for conv in convs:
        ids = torch.tensor([prompt_ids(tokenizer, conv)])
        for _ in range(sampling.n):
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=eot,
                pad_token_id=eot,
            )
            new = out[0, ids.shape[1] :].tolist()
            tokens += new.index(eot) + 1 if eot in new else len(new)
    return tokens


def _engine_tokens(engine, convs, sampling) -> int:
    return sum(c.num_tokens for per in engine.generate(convs, sampling) for c in per)


@pytest.mark.parametrize("provider", ["hf-reference", "hf", "vllm"])
def test_rollout_throughput(provider, workload, benchmark, bench_record, quick):
    path, convs, sampling = workload
    model_cfg = ModelConfig(name_or_path=str(path), dtype="float32")
    if provider == "vllm":
        pytest.importorskip("vllm")
    with vllm_lock() if provider == "vllm" else contextlib.nullcontext():
        _measure(provider, model_cfg, convs, sampling, benchmark, bench_record, quick)


def _measure(provider, model_cfg, convs, sampling, benchmark, bench_record, quick: bool) -> None:
    t0 = time.perf_counter()
    engine = make_engine(
        model_cfg,
        EngineConfig(backend="hf" if provider.startswith("hf") else "vllm", batch_size=len(convs), enforce_eager=True),
    )
    startup = time.perf_counter() - t0
    if provider == "hf-reference" and quick:
        convs = convs[:2]  # one sequence at a time: its rate does not depend on how many; --quick keeps it short
    try:
        if provider == "hf-reference":
            run = lambda: _reference(engine.model, engine.tokenizer, convs, sampling)  # noqa: E731
        else:
            run = lambda: _engine_tokens(engine, convs, sampling)  # noqa: E731
            _engine_tokens(engine, convs[:1], Sampling(n=1, max_new_tokens=8))  # warm-up (allocations, caches)
        t0 = time.perf_counter()
        with peak_memory("cpu") as peak:  # this process only: vLLM's engine core may run in a child
            tokens = benchmark.pedantic(run, rounds=1, iterations=1)
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    tps = tokens / wall
    RESULTS[provider] = tps
    figures = {"tokens_per_s": tps, "generated_tokens": tokens, "generate_s": wall, "startup_s": startup}
    figures["peak_memory_mib"] = peak.peak_mib if provider != "vllm" else None
    if provider != "hf-reference" and "hf-reference" in RESULTS:
        figures["speedup_vs_reference"] = tps / RESULTS["hf-reference"]
    params = {"provider": provider, "shape": "toy", "problems": len(convs), "k": K, "max_new_tokens": 256}
    bench_record("rollout", f"toy/{provider}", figures, params, device="cpu", benchmark=benchmark)
    print(f"\n[rollout bench] {provider}: {tokens} tokens in {wall:.1f}s = {tps:.0f} tok/s (startup {startup:.1f}s)")
    assert tokens > 0
