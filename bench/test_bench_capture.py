"""Teacher capture on CPU: store bytes per distilled row and capture throughput of the hf and vllm backends.

Run: ``pytest bench/test_bench_capture.py [--quick]`` (wrap in ``flock /tmp/ssb-vllm.lock`` on a shared
machine). The model is a seeded random Qwen2 the size of the toy asset (hidden 256, 4 layers, a 1,024-token
byte-level BPE), so the figures measure the capture machinery, not a particular checkpoint. Results go to
``bench/results/capture.json`` (``bench_record``, which names the hardware).
"""

import random
import shutil
import time

import pytest
import torch
from measure import peak_memory

from ssb.capture import capture, plan_capture
from ssb.capture.hf import HFCapture
from ssb.config import load_config
from ssb.core.files import atomic_write_jsonl
from ssb.core.prompts import student_messages, teacher_messages
from ssb.store import TeacherStore

QWEN_VOCAB = 151_936  # Qwen2.5 LM-head rows: what the reference's dense float32 store holds per token
K = 64
MODEL = "random Qwen2: hidden 256, 4 layers, vocab 1024, float32"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, quick):
    """Model dir + curated files: 8 examples with --quick, else 32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ssb.toy.world import build_tokenizer, problems, tokenizer_corpus

    n = 8 if quick else 32
    root = tmp_path_factory.mktemp("bench-capture")
    tok = build_tokenizer(tokenizer_corpus(seed=0, n=400), vocab_size=1024)
    tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64 * -(-len(tok) // 64), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(root / "model")
    rng = random.Random(0)
    teacher, student = [], []
    for i, p in enumerate(problems("train", n, 0)):
        reply = "\n\n".join(p.robust_solution(rng) for _ in range(3))  # ~3x the toy length: closer to real replies
        done = {"role": "assistant", "content": reply}
        teacher.append({"id": f"b{i}", "messages": [*teacher_messages(p.question(), p.plain_solution(), "?"), done]})
        student.append({"id": f"b{i}", "messages": [*student_messages(p.question()), done]})
    atomic_write_jsonl(root / "teacher.jsonl", teacher)
    atomic_write_jsonl(root / "student.jsonl", student)
    return root


def _cfg(root, backend: str):
    return load_config(None, [f"model.name_or_path={root / 'model'}", "model.dtype=float32", f"capture.k={K}",
                              f"capture.backend={backend}", "capture.shard_examples=8", "capture.token_budget=4096",
                              "engine.max_model_len=2048", "engine.enforce_eager=true"])  # fmt: skip


def _run(benchmark, bench_record, root, backend_name: str, make_backend) -> dict:
    """Build the backend (start-up timed apart), capture every example once, measure the store."""
    cfg = _cfg(root, backend_name)
    plan = plan_capture(cfg, root / "teacher.jsonl", root / "student.jsonl")
    tokens = sum(len(it.prompt) + len(it.reply) - 1 for it in plan.items)  # teacher tokens forwarded
    t0 = time.perf_counter()
    backend = make_backend(cfg)
    startup = time.perf_counter() - t0
    out = root / f"store-{backend_name}"
    run = lambda: capture(cfg, root / "teacher.jsonl", root / "student.jsonl", out, backend=backend)  # noqa: E731
    try:
        with peak_memory("cpu") as peak:  # this process only: vLLM's engine core may run in a child
            m = benchmark.pedantic(run, setup=lambda: shutil.rmtree(out, ignore_errors=True), rounds=1, iterations=1)
    finally:
        if hasattr(backend, "close"):
            backend.close()
    seconds = benchmark.stats.stats.mean
    bpr = TeacherStore(out).bytes_per_row()
    rows = m["counts"]["rows"]
    figures = {
        "tokens_per_s": tokens / seconds,
        "rows_per_s": rows / seconds,
        "capture_s": seconds,
        "startup_s": startup,
        "peak_memory_mib": peak.peak_mib if backend_name == "hf" else None,
        "bytes_per_row": bpr,
        "bytes_per_row_bound": 8 * K + 16,
        "dense_fp32_bytes_per_row_qwen": 4 * QWEN_VOCAB,
        "ratio_to_dense_qwen": bpr / (4 * QWEN_VOCAB),
    }
    params = {"provider": backend_name, "shape": MODEL, "k": K, "examples": m["counts"]["examples"], "rows": rows,
              "teacher_tokens": tokens, "exact_temperatures": m["exact_temperatures"],
              "torch_threads": torch.get_num_threads()}  # fmt: skip
    bench_record("capture", f"{backend_name}/toy-random", figures, params, device="cpu", benchmark=benchmark)
    return figures


def test_bench_capture_hf(benchmark, bench_record, setup):
    info = _run(benchmark, bench_record, setup, "hf", lambda cfg: HFCapture(cfg))
    assert info["bytes_per_row"] <= 8 * K + 16  # the storage target with float32 values


@pytest.mark.vllm
def test_bench_capture_vllm(benchmark, bench_record, setup):
    pytest.importorskip("vllm")
    from ssb.capture.vllm import VLLMCapture
    from ssb.engines import vllm_lock

    with vllm_lock():  # one vLLM instance at a time on a shared machine
        info = _run(benchmark, bench_record, setup, "vllm", lambda cfg: VLLMCapture(cfg))
    assert info["bytes_per_row"] <= 8 * K + 16
