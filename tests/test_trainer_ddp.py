"""End-to-end ``ssb train`` from a run directory (student.jsonl + teacher store), single process and
``torchrun --nproc_per_node 2`` (DDP over gloo on CPU): same global batch, same losses and adapter.

The run directory is built here: a small ChatML BPE tokenizer (``ssb.toy.build_tokenizer``), a tiny random
Qwen2 student, toy problems as curated examples, and a store written with ``ssb.store.StoreWriter`` from a
second random model's top-k log-probs (exact c_T at T = 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_qwen import tiny_qwen

from ssb.cli import main as ssb_main

T = 2.0


@pytest.fixture(scope="module")
def run_world(tmp_path_factory):
    from ssb.core.prompts import prompt_ids, reply_ids, student_messages
    from ssb.store import StoreExample, StoreWriter, chat_template_hash, tokenizer_hash
    from ssb.toy import world as toy

    root = tmp_path_factory.mktemp("ddp")
    tok = toy.build_tokenizer(toy.tokenizer_corpus(n=60), vocab_size=320)
    model_dir = root / "student"
    tiny_qwen(len(tok), 0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    teacher = tiny_qwen(len(tok), 1)

    run_dir = root / "template_run"
    records, examples = [], []
    for i, p in enumerate(toy.problems("train", 8, seed=0)):
        msgs = [*student_messages(p.question()), {"role": "assistant", "content": p.plain_solution()}]
        records.append({"id": f"toy-{i}", "messages": msgs, "answer": str(p.answer)})
        pids, rids = prompt_ids(tok, msgs[:-1]), reply_ids(tok, msgs[-1]["content"])
        with torch.no_grad():
            logits = teacher(torch.tensor([pids + rids[:-1]])).logits[0, len(pids) - 1 :].double()  # (R, V)
        logp = torch.log_softmax(logits, -1)
        vals, ids = logp.topk(16, -1)
        examples.append(
            StoreExample(
                example_index=i,
                token_ids=torch.tensor(rids, dtype=torch.int32),
                topk_ids=ids.int(),
                topk_logprobs=vals.float(),
                lse={1.0: torch.zeros(len(rids)), T: torch.logsumexp(logp / T, -1).float()},
                token_logprob=logp.gather(1, torch.tensor(rids)[:, None])[:, 0].float(),
            )
        )
    (run_dir / "curate").mkdir(parents=True)
    (run_dir / "curate" / "student.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    header = {
        "fingerprint": "test",
        "model": {"id": str(model_dir), "revision": None, "dtype": "float32", "vocab_size": len(tok)},
        "tokenizer": {"hash": tokenizer_hash(tok), "chat_template": chat_template_hash(tok), "size": len(tok)},
        "temperatures": [1.0, T],
        "exact_temperatures": [1.0, T],
    }
    writer = StoreWriter(run_dir / "capture", header, k=16, value_dtype="float32", temperatures=[1.0, T])
    writer.write_shard(0, examples, [])
    writer.finish(1)
    return {"root": root, "model_dir": model_dir, "template": run_dir}


def _config(world: dict, name: str, **train) -> tuple[Path, Path]:
    """A fresh run dir (copy of the curated inputs + store) and a YAML config for it."""
    import shutil

    run_dir = world["root"] / name
    shutil.copytree(world["template"], run_dir)
    base = dict(lora_r=8, lora_alpha=16, lr=1e-2, max_steps=3, warmup_ratio=0.0, kd_temperature=T, seed=0)
    base.update(train)
    cfg = {"run_dir": str(run_dir), "model": {"name_or_path": str(world["model_dir"]), "dtype": "float32"}}
    cfg["train"] = base
    path = run_dir / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return run_dir, path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(run_world):
    # one process: 2 micro-batches of 2 (global batch 4); two ranks: 1 micro-batch of 2 each (global batch 4)
    single, cfg_single = _config(run_world, "single", batch_size=2, grad_accum=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread per process, like each DDP rank below
    try:
        assert ssb_main(["train", "--config", str(cfg_single)]) == 0
    finally:
        torch.set_num_threads(threads)
    ddp, cfg_ddp = _config(run_world, "ddp", batch_size=2, grad_accum=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "ssb", "train", "--config", str(cfg_ddp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    facts = [json.loads((d / "train" / "train_facts.json").read_text()) for d in (single, ddp)]
    assert [f["world_size"] for f in facts] == [1, 2]
    m1, m2 = _metrics(single), _metrics(ddp)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [0, 1, 2]
    assert_same_curve(m1, m2, loss_rel=1e-5, grad_rel=1e-4)
    w1 = load_file(single / "train" / "adapter" / "adapter_model.safetensors")
    w2 = load_file(ddp / "train" / "adapter" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:  # Adam can amplify fp32 noise in a near-zero gradient element to a fraction of lr (1e-2)
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-4)
    assert m1[-1]["kd_loss"] < m1[0]["kd_loss"]


def assert_same_curve(m1: list[dict], m2: list[dict], *, loss_rel: float, grad_rel: float) -> None:
    """Two runs' metrics.jsonl records: the same steps and tokens, kd_loss and grad_norm within the bounds."""
    for a, b in zip(m1, m2, strict=True):
        assert a["distilled_tokens"] == b["distilled_tokens"]
        assert a["kd_loss"] == pytest.approx(b["kd_loss"], rel=loss_rel)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=grad_rel)
