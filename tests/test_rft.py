"""The RFT baseline (ssb.run.rft): CE on the base model's own correct rollouts, one per problem, for the trained
tokens of the run it matches; trained on the toy model from scripted rollouts."""

from __future__ import annotations

import json
from pathlib import Path

from test_curation import make_run

from ssb.core.layout import RunLayout
from ssb.run.rft import RFT, correct_rollouts, train_rft


def test_rft_trains_on_one_correct_rollout_per_problem_for_the_matched_tokens(tmp_path, toy_model_dir):
    over = {"model.name_or_path": str(toy_model_dir), "model.dtype": "float32", "train.lora_r": 4,
            "train.lora_alpha": 8, "train.batch_size": 2, "train.loss_impl": "eager",
            "train.gradient_checkpointing": "false", "train.target_modules": "[q_proj,v_proj]"}  # fmt: skip
    cfg, _ = make_run(tmp_path, **over)
    rows = correct_rollouts(cfg)
    # every problem with a finished correct sample, its first one; p2 has none, p3's only right answer was cut
    assert [r["id"] for r in rows] == ["p0", "p1", "p4", "p5", "p6", "p7", "p8", "p9", "p10"]
    assert [r["sample"] for r in rows] == [0] * 9
    assert all(r["messages"][-1]["content"] == f"so the answer is \\boxed{{{r['answer']}}}" for r in rows)
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]

    layout = RunLayout(cfg.run_dir)
    sft_metrics = layout.metrics("train_sft")
    sft_metrics.parent.mkdir(parents=True)
    sft_metrics.write_text(json.dumps({"step": 0, "distilled_tokens": 300}) + "\n")  # the SFT control's tokens
    assert train_rft(cfg, match="train_sft") == 0
    assert (layout.adapter(RFT) / "adapter_config.json").is_file()
    metrics = [json.loads(x) for x in layout.metrics(RFT).read_text().splitlines()]
    per_step = metrics[0]["distilled_tokens"]
    assert abs(sum(m["distilled_tokens"] for m in metrics) - 300) <= per_step  # matched within one step
    assert all(m["kd_loss"] == 0 and m["loss"] == m["ce_loss"] for m in metrics)  # CE only
    pairs = [json.loads(x) for x in (Path(cfg.run_dir) / RFT / "pairs.jsonl").read_text().splitlines()]
    assert pairs == rows
