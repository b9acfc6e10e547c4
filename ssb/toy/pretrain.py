"""Pretraining of the toy model (``python -m ssb.toy pretrain --out ssb/assets/toy``).

The data stream is deterministic in ``--seed`` and mixes three kinds of sequences, all drawn from the
``pretrain`` split only (train/test problems are never seen):

- bare: system + question -> plain solution; trap steps follow the misconception with ``MISCONCEPTION_RATE``;
- hinted: system + the hinted template (question, a model-like correct and a wrong solution) -> robust solution;
- drill: lines of the arithmetic facts the solutions need (``84 - 15 = 69``), loss on the results only.

Loss is next-token cross-entropy on reply (or drill result) tokens only. Prompts are built exactly as inference
builds them (``ssb.core.prompts.prompt_ids`` + ``reply_ids``), so training text == inference prompts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ssb.core.files import atomic_write_json
from ssb.core.prompts import prompt_ids, reply_ids, student_messages, teacher_messages
from ssb.toy import world as toy


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    steps: int = 1500
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.05
    hidden: int = 128
    intermediate: int = 512
    layers: int = 4
    heads: int = 2  # head_dim 64: supported by vLLM's CPU attention
    kv_heads: int = 2
    bare_batch: int = 24
    hinted_batch: int = 8
    drill_batch: int = 24
    mix: tuple[float, float, float] = (0.45, 0.17, 0.38)  # bare, hinted, drill batches
    robust_attempts: float = 0.0  # share of hinted examples whose shown attempts are in the robust style
    save_every: int = 250


# --------------------------------------------------------------------------------------------------
# Data


def _pretrain_problem(rng: random.Random) -> toy.ToyProblem:
    while True:
        p = toy.sample_problem(rng)
        if p.split() == "pretrain":
            return p


def _slip(solution: str, answer: int, rng: random.Random) -> str:
    """A wrong solution by an arithmetic slip in the last step (the final number changes everywhere)."""
    wrong = answer + rng.choice([-1, 1]) * rng.randint(1, 10)
    if wrong < 0:
        wrong = answer + rng.randint(1, 10)
    head, _, tail = solution.rpartition(f"= {answer} ")
    return f"{head}= {wrong} {tail}".replace(f"\\boxed{{{answer}}}", f"\\boxed{{{wrong}}}")


def wrong_solution(p: toy.ToyProblem, rng: random.Random) -> str:
    """A model-like wrong attempt: a misconception when the problem has a trap (75%), else an arithmetic slip."""
    if p.misconception_answers() and rng.random() < 0.75:  # (a trap may not change the answer: 2 * 2 = 2 + 2)
        while True:
            we, wg = "each" in p.traps and rng.random() < 0.6, "gives" in p.traps and rng.random() < 0.6
            if p.values(we, wg)[3] != p.answer():
                return p.plain_solution(we, wg)
    return _slip(p.plain_solution(), p.answer(), rng)


def bare_example(tok, rng: random.Random) -> tuple[list[int], list[int]]:
    p = _pretrain_problem(rng)
    we = "each" in p.traps and rng.random() < toy.MISCONCEPTION_RATE
    wg = "gives" in p.traps and rng.random() < toy.MISCONCEPTION_RATE
    prompt = prompt_ids(tok, student_messages(p.question()))
    reply = reply_ids(tok, p.plain_solution(we, wg))
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)


def robust_attempt(p: toy.ToyProblem, rng: random.Random) -> str:
    """A wrong attempt in the robust style, as a student distilled from the robust teacher writes it (later
    rounds show the teacher such attempts): a misconception despite the caution, or a number copied wrong."""
    if p.misconception_answers() and rng.random() < 0.5:
        while True:
            we, wg = "each" in p.traps and rng.random() < 0.6, "gives" in p.traps and rng.random() < 0.6
            if p.values(we, wg)[3] != p.answer():
                return p.robust_solution(rng, we, wg)
    others = [c for c in range(1, min(9, p.a * p.b - 1) + 1) if c != p.c]
    return dataclasses.replace(p, c=rng.choice(others)).robust_solution(rng)  # the question's C misread


def hinted_example(tok, rng: random.Random, robust_attempts: float = 0.0) -> tuple[list[int], list[int]]:
    p = _pretrain_problem(rng)
    if robust_attempts and rng.random() < robust_attempts:  # attempts by a student writing the robust style
        correct, wrong = p.robust_solution(rng), robust_attempt(p, rng)
    else:
        correct = p.plain_solution() if rng.random() < 0.85 else p.robust_solution(rng)
        wrong = wrong_solution(p, rng)
    prompt = prompt_ids(tok, teacher_messages(p.question(), correct, wrong))
    reply = reply_ids(tok, p.robust_solution(rng))
    return prompt + reply, [0] * len(prompt) + [1] * len(reply)


def drill_example(tok, rng: random.Random, lines: int = 16) -> tuple[list[int], list[int]]:
    """Arithmetic facts in the solutions' format; only the result tokens carry loss."""
    ids: list[int] = []
    mask: list[int] = []
    for _ in range(lines):
        kind = rng.random()
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        if kind < 0.3:
            lhs, res = f"{a} * {b} =", a * b
        elif kind < 0.4:
            lhs, res = f"{a} + {b} =", a + b
        else:
            x, c = rng.randint(4, 81), rng.randint(1, 9)
            if kind < 0.7:
                lhs, res = f"{x} + {c} =", x + c
            else:
                c = min(c, x - 1)
                lhs, res = f"{x} - {c} =", x - c
        left = tok(lhs, add_special_tokens=False)["input_ids"]
        right = tok(f" {res}\n", add_special_tokens=False)["input_ids"]
        ids += left + right
        mask += [0] * len(left) + [1] * len(right)
    return ids, mask


def make_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) ids and (B, L) next-token labels (-100 where no loss).

    Shape:
        input_ids (B, L) long, labels (B, L) long; labels[:, t] is the target for position t (already shifted).
    """
    width = 32 * math.ceil(max(len(ids) for ids, _ in examples) / 32)  # few distinct shapes: fewer oneDNN plans
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        target = torch.tensor(ids[1:] + [pad_id])
        keep = torch.tensor(mask[1:] + [0], dtype=torch.bool)
        labels[row, : len(ids)] = torch.where(keep, target, torch.full_like(target, -100))
    return input_ids, labels


# --------------------------------------------------------------------------------------------------
# Model and loop


def make_model(cfg: PretrainConfig, tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = 64 * math.ceil(len(tok) / 64)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eot,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(config)


def save_asset(model, tok, out: Path, log: dict) -> None:
    """Write weights, config, tokenizer and training log via a temp dir, then move files into place."""
    from transformers import GenerationConfig

    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(eos_token_id=[eot, tok.pad_token_id], pad_token_id=tok.pad_token_id).save_pretrained(tmp)
    atomic_write_json(tmp / "training_log.json", log)
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def pretrain(cfg: PretrainConfig, out: Path, init: Path | None = None) -> dict:
    """Train from scratch (tokenizer built from the seeded corpus), or continue from ``init`` (its weights and
    tokenizer; a fresh optimizer and lr schedule). Saves into ``out`` every ``save_every`` steps."""
    # One thread by default: on a shared 2-core box two OpenMP threads ran ~8x slower than one (barrier stalls).
    torch.set_num_threads(int(os.environ.get("SSB_TOY_THREADS", "1")))
    if init is None:
        tok = toy.build_tokenizer(toy.tokenizer_corpus(cfg.seed))
        model = make_model(cfg, tok)
        earlier = []
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(init)
        model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
        prev = json.loads((init / "training_log.json").read_text())
        earlier = prev.get("phases", []) + [{k: v for k, v in prev.items() if k != "phases"}]
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    rng = random.Random(f"toy-pretrain-{cfg.seed}")
    hinted = functools.partial(hinted_example, robust_attempts=cfg.robust_attempts)
    makers = {
        "bare": (bare_example, cfg.bare_batch),
        "hinted": (hinted, cfg.hinted_batch),
        "drill": (drill_example, cfg.drill_batch),
    }
    log = {"config": asdict(cfg), "init": str(init) if init else None, "params": n_params, "vocab": len(tok)}
    log.update(phases=earlier, history=[])
    t0, seen_tokens, running = time.time(), 0, {}
    model.train()
    for step in range(1, cfg.steps + 1):
        # lr: linear warmup then cosine to 10%
        frac = min(1.0, step / cfg.warmup) if step <= cfg.warmup else None
        if frac is None:
            prog = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            frac = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * frac
        # batch of one kind (similar lengths, little padding)
        kind = rng.choices(list(makers), weights=cfg.mix)[0]
        fn, bsz = makers[kind]
        input_ids, labels = make_batch([fn(tok, rng) for _ in range(bsz)], tok.pad_token_id)
        # forward/backward: loss = mean CE over reply tokens
        logits = model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen_tokens += input_ids.numel()
        running[kind] = 0.9 * running.get(kind, loss.item()) + 0.1 * loss.item()
        if step % 50 == 0 or step == cfg.steps:
            elapsed = time.time() - t0
            entry = {
                "step": step,
                "minutes": round(elapsed / 60, 2),
                "tokens": seen_tokens,
                **{f"loss_{k}": round(v, 4) for k, v in running.items()},
            }
            log["history"].append(entry)
            print(json.dumps(entry), flush=True)
        if step % cfg.save_every == 0 or step == cfg.steps:
            log.update(steps_done=step, minutes=round((time.time() - t0) / 60, 2), tokens=seen_tokens)
            save_asset(model, tok, out, log)
    return log
