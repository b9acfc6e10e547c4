"""Max distillation context under a memory cap, fused vs eager loss: the trainer's ``ssb train --dry-run``.

GPU: a Qwen2.5-3B-shaped random-weight QLoRA student (configs/qwen2.5_3b_config.json, NF4 base, k = 64) under
``torch.cuda.set_per_process_memory_fraction`` = 24 GiB ("max context on a 24 GiB card"); each run is a child
process so the memory cap never leaks into other benchmarks. CPU (not with --quick): the toy body with a
32,768-token vocabulary under a 2 GiB peak-RSS cap, and the real SmolLM2-135M-Instruct (its own weights, fp32,
LoRA and QLoRA) under an 8 GiB cap up to its 8,192-position context; every probe a fresh process (see
ssb/train/dryrun.py).
Figures: ``max_seq_len_tokens`` (gated by bench/check.py: lower is worse) and the peak at that length.
Run: ``pytest bench/test_bench_maxctx.py`` (part of ``pytest bench``) on a machine with ssb installed; bench/gpu.sh
measures the kernels alone and does not run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOY_32K = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
           "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32768, "max_position_embeddings": 4096,
           "tie_word_embeddings": True}  # fmt: skip


def _dry_run(tmp_path: Path, arch: str, cap_gib: float, dtype: str, qlora: bool, timeout: float, *extra) -> dict:
    """``python -m ssb train --dry-run`` in a child process; returns its dry_run.json."""
    overrides = [f"run_dir={tmp_path}", f"train.dry_run_config={arch}", f"train.dry_run_mem_gib={cap_gib}",
                 f"model.dtype={dtype}", f"train.qlora={str(qlora).lower()}", "capture.k=64", *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "ssb", "train", "--dry-run", *overrides]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    print(out.stdout)
    return json.loads((tmp_path / "train" / "dry_run.json").read_text())


def _record(bench_record, report: dict, shape: str, device: str) -> None:
    for provider, r in report["results"].items():
        peak = r.get("peak_gib", r.get("peak_rss_gib"))
        params = {"provider": provider, "loss_impl": r["loss_impl"], "shape": shape, "cap_gib": report["cap_gib"],
                  "qlora": report["qlora"], "k": report["k"], "measured": report["measured"]}  # fmt: skip
        figures = {"max_seq_len_tokens": r["max_seq_len"], "gib_at_max_len": peak, "search_s": r["probe_s"]}
        bench_record("maxctx", f"{shape}/{provider}/{device}", figures, params, device=device)
    fused, eager = (report["results"][p]["max_seq_len"] for p in ("fused", "eager"))
    assert fused >= eager, f"fused {fused} vs eager {eager} tokens: the fused loss must not fit less"


@pytest.mark.gpu
def test_max_context_24gib_qlora_qwen3b(bench_record, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install -e '.[gpu]')")
    report = _dry_run(tmp_path, "configs/qwen2.5_3b_config.json", 24.0, "bfloat16", True, timeout=420)
    _record(bench_record, report, "qwen2.5-3b-qlora", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU variant measures the real shape")
def test_max_context_cpu_toy_32k_vocab(bench_record, quick, tmp_path):
    if quick:
        pytest.skip("CPU max-context search spawns ~20 probe processes (~2 min); run without --quick")
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(TOY_32K))
    report = _dry_run(tmp_path, str(arch), 2.0, "float32", False, timeout=600)
    _record(bench_record, report, "toy-32k-vocab-lora", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the suite measures the 3B shape")
@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_max_context_cpu_real_smollm2_8gib(bench_record, quick, tmp_path, smollm2_dir, qlora):
    if quick:
        pytest.skip("probes of up to 8,192 tokens on a 135M model take minutes each on CPU; run without --quick")
    if qlora:
        pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    report = _dry_run(tmp_path, "pretrained", 8.0, "float32", qlora, 3600, f"model.name_or_path={smollm2_dir}")
    _record(bench_record, report, f"smollm2-135m-{'qlora' if qlora else 'lora'}", "cpu")
