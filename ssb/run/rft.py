"""The RFT baseline of ``ssb demo`` (rejection-sampling fine-tuning): cross-entropy on the base model's own correct
rollouts, the bar a hinted teacher must clear to be worth its prompt.

Same LoRA and recipe as the SFT control (:func:`ssb.run.demo.sft_config`: CE instead of KD), trained on
``RUN_DIR/rollout/rollouts.jsonl``'s correct samples as the target text (bare question -> the model's own correct
reply, through the same chat template), for the trained-token count of the run it matches (the demo: the SFT
control's ``RUN_DIR/train_sft/metrics.jsonl``; within one step), into ``RUN_DIR/train_rft``; the conversations it
trained on are written to ``RUN_DIR/train_rft/pairs.jsonl``.
"""

from __future__ import annotations

import dataclasses

import torch

from ssb.config import SSBConfig
from ssb.core.files import atomic_write_jsonl, iter_jsonl
from ssb.core.layout import RunLayout
from ssb.core.prompts import prompt_ids, reply_ids, student_messages
from ssb.core.rollouts import read_rollouts

RFT = "train_rft"  # train.output_subdir of the RFT baseline


def rft_config(cfg: SSBConfig) -> SSBConfig:
    """The RFT baseline: the SSB training config with CE on the reply tokens instead of KD."""
    train = dataclasses.replace(cfg.train, kd_weight=0.0, ce_weight=1.0, output_subdir=RFT)
    return dataclasses.replace(cfg, train=train)


def correct_rollouts(cfg: SSBConfig) -> list[dict]:
    """One conversation per problem with a correct rollout: its first correct sample (by sample index).

    One per problem, not every correct sample: like SSB's one robust solution per problem, each problem weighs the
    same, so the problems the model already solves every time (K correct samples) do not outweigh the rest K to 1.
    A cut sample is never correct (``ssb.core.grading``), so no reply here ran into the token limit."""
    problems, by_id = read_rollouts(RunLayout(cfg.run_dir))
    out = []
    for p in problems:
        first = next((r for r in sorted(by_id[p["id"]], key=lambda r: r["sample"]) if r["correct"]), None)
        if first is not None:
            reply = {"role": "assistant", "content": first["text"]}
            out.append(
                {
                    "id": p["id"],
                    "sample": first["sample"],
                    "answer": p["answer"],
                    "messages": [*student_messages(p["question"]), reply],
                }
            )
    return out


def ce_examples(rows: list[dict], tokenizer) -> list:
    """Training examples for CE alone: the student view and reply, with the reply's own tokens as a one-hot
    teacher (k = 1, log-prob 0, c_T = 0), which the trainer never reads at ``train.kd_weight=0``."""
    from ssb.store.pairing import DistillExample

    out = []
    for i, row in enumerate(rows):
        p_ids, r_ids = prompt_ids(tokenizer, row["messages"][:-1]), reply_ids(tokenizer, row["messages"][-1]["content"])
        tokens = torch.tensor(r_ids, dtype=torch.long)  # (R,)
        out.append(
            DistillExample(
                example_index=i,
                input_ids=torch.tensor(p_ids + r_ids[:-1], dtype=torch.long),
                reply_start=len(p_ids) - 1,
                token_ids=tokens,
                topk_ids=tokens[:, None],
                topk_logprobs=torch.zeros(len(r_ids), 1),
                lse_t=torch.zeros(len(r_ids)),
            )
        )
    return out


def train_rft(cfg: SSBConfig, match: str) -> int:
    """Train the RFT baseline for as many tokens as the training in ``RUN_DIR/<match>`` (the SFT control) trained."""
    from ssb.core.models import load_tokenizer
    from ssb.train import train

    layout = RunLayout(cfg.run_dir)
    rows = correct_rollouts(cfg)
    examples = ce_examples(rows, load_tokenizer(cfg.model))
    target = sum(rec.get("distilled_tokens", 0) for _, rec in iter_jsonl(layout.metrics(match)))
    per_step = sum(int(ex.token_ids.numel()) for ex in examples) / len(examples) * cfg.train.batch_size
    steps = max(1, round(target / (per_step * cfg.train.grad_accum)))
    rcfg = rft_config(cfg)
    train(
        dataclasses.replace(rcfg, train=dataclasses.replace(rcfg.train, max_steps=steps)),
        cfg.run_dir,
        examples=examples,
    )
    atomic_write_jsonl(layout.train(RFT) / "pairs.jsonl", rows)
    return 0
