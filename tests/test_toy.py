"""The toy world: generator determinism and splits, the shipped asset (transformers and vLLM), and the
behaviour the pipeline relies on (bare accuracy in the middle, a reliable non-copying hinted teacher, errors
caused by the planted misconceptions), measured on held-out problems with fixed seeds."""

from __future__ import annotations

import json
import random

import pytest

from ssb.core.prompts import prompt_ids, reply_ids, student_messages, teacher_messages
from ssb.toy import world as toy
from ssb.toy.measure import _extract, is_copy, measure
from ssb.toy.pretrain import robust_attempt


def _structure(p: toy.ToyProblem) -> tuple:
    return (p.group, p.change, p.a, p.b, p.c)


# --------------------------------------------------------------------------------------------------
# Generator


def test_generator_is_deterministic_and_seeded():
    assert toy.problems("test", 40, 0) == toy.problems("test", 40, 0)
    assert toy.problems("test", 40, 0) != toy.problems("test", 40, 1)


def test_splits_are_disjoint_in_structure():
    sets = {s: {_structure(p) for p in toy.problems(s, 150, 0)} for s in toy.SPLITS}
    assert not sets["train"] & sets["test"]
    assert not sets["pretrain"] & (sets["train"] | sets["test"])
    assert all(p.split() == "test" for p in toy.problems("test", 50, 3))


def test_write_splits_gsm8k_format(tmp_path):
    train, test = toy.write_splits(tmp_path, 20, 30, seed=0)
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert len(rows) == 30 and len(train.read_text().splitlines()) == 20
    for row, p in zip(rows, toy.problems("test", 30, 0)):
        assert row["question"] == p.question()
        assert row["answer"].endswith(f"#### {p.answer()}")
    assert {r["question"] for r in rows}.isdisjoint(json.loads(x)["question"] for x in train.read_text().splitlines())


def test_misconceptions_are_wording_tied_and_change_the_answer():
    rng = random.Random(0)
    for _ in range(300):
        p = toy.sample_problem(rng)
        assert p.answer() > 0 and all(a > 0 for a in p.misconception_answers())
        assert ("each" in p.traps) == (" each." in p.question())
        assert ("gives" in p.traps) == ("gives away" in p.question())
        if not p.traps:  # neutral wordings: the misconception flags do nothing
            assert p.plain_solution(True, True) == p.plain_solution()
        assert _extract(p.plain_solution()) == str(p.answer())
        robust = p.robust_solution(rng)
        assert _extract(robust) == str(p.answer()) and not is_copy(robust, p.plain_solution())
        if p.traps:  # the robust style with a misconception followed: a later round's student's wrong attempt
            assert _extract(p.robust_solution(rng, True, True)) == str(p.values(True, True)[3])
        attempt = robust_attempt(p, rng)
        assert attempt.startswith("We need the number of") and _extract(attempt) != str(p.answer())


# --------------------------------------------------------------------------------------------------
# The shipped asset


@pytest.fixture(scope="module")
def hf_toy():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = toy.asset_path()
    if not (path / "model.safetensors").exists():
        pytest.fail(f"toy asset missing at {path}: run `python -m ssb.toy pretrain`")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_asset_tokenizer_chat_template_and_digits(hf_toy):
    tok, model = hf_toy
    assert model.config.tie_word_embeddings and model.config.model_type == "qwen2"
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    msgs = student_messages("Ada has 7 boxes of 8 pens.")
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.decode(prompt_ids(tok, msgs)) == text
    ids = tok("84 - 15 = 69", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()] == list("841569")
    assert reply_ids(tok, "x")[-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


def test_transformers_generates_a_boxed_answer(hf_toy):
    import torch

    tok, model = hf_toy
    p = toy.problems("test", 1, 0)[0]
    ids = torch.tensor([prompt_ids(tok, student_messages(p.question()))])
    out = model.generate(ids, max_new_tokens=80, do_sample=False, eos_token_id=tok.eos_token_id)
    reply = out[0, ids.shape[1] :].tolist()
    assert reply[-1] == tok.eos_token_id, tok.decode(reply)
    assert _extract(tok.decode(reply, skip_special_tokens=True)) is not None


# --------------------------------------------------------------------------------------------------
# vLLM (one shared engine per session, from conftest)


@pytest.mark.vllm
def test_vllm_generates_k_samples_per_prompt(vllm_engine, toy_model_dir):
    from ssb.engines import Sampling

    if toy_model_dir != toy.asset_path():
        pytest.fail("conftest did not pick up the toy asset")
    probs = toy.problems("test", 3, 0)
    convs = [student_messages(probs[0].question()), teacher_messages(probs[1].question(), "a", "b")]
    out = vllm_engine.generate(convs, Sampling(n=4, temperature=0.8, max_new_tokens=160, seed=0))
    assert [len(s) for s in out] == [4, 4]
    assert all(c.token_ids and c.finish_reason in ("stop", "length") for s in out for c in s)
    assert any(_extract(c.text) is not None for s in out for c in s)


@pytest.fixture(scope="module")
def toy_numbers(vllm_engine) -> dict:
    """The issue's acceptance numbers, measured once (seeded, 120 held-out problems x 4 samples)."""
    m = measure(vllm_engine, n=120, k=4, seed=0)
    return {k: v for k, v in m.items() if not k.startswith("example")}


@pytest.mark.vllm
@pytest.mark.slow
def test_toy_world_bare_accuracy_and_copy_rate(toy_numbers):
    m = toy_numbers
    assert 0.25 <= m["bare_pass@1"] <= 0.75, m
    assert m["copy_rate"] < 0.5, m


@pytest.mark.vllm
@pytest.mark.slow
def test_toy_world_hinted_teacher_and_planted_errors(toy_numbers):
    m = toy_numbers
    assert m["hinted_pass@1"] >= 0.85, m
    # The planted misconception, not arithmetic, is why bare samples fail; trap-free problems are solved.
    assert m["misconception_share_of_errors"] >= 0.8, m
    assert m["bare_pass@1_no_trap_problems"] >= 0.85, m
