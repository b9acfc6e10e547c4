"""Base vs a random LoRA adapter on the toy model through both engines (vLLM with LoRARequest, HF with PeftModel).

Greedy decoding in float32 makes the two engines write (almost always) the same text; wherever they do, the
eval must give the same extracted answer and verdict. The adapter is random but large enough to change some
outputs, which shows that both engines really apply it.
"""

import pytest
import torch

from ssb.config import EngineConfig, EvalConfig, ModelConfig
from ssb.engines import make_engine
from ssb.eval import compare, evaluate

N_PROBLEMS = 12
LORA_SCALE = 0.1  # std of the random lora_B entries: large enough to flip some greedy tokens


@pytest.fixture(scope="module")
def random_adapter(toy_model_dir, tmp_path_factory):
    """A rank-8 LoRA on q/v/o/up projections with lora_B drawn at random (PEFT initialises it to zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_SCALE)
    out = tmp_path_factory.mktemp("random-lora")
    peft_model.save_pretrained(out)
    return str(out)


def _eval_pair(engine, model_dir, bench, out, adapter):
    """Base then adapter through one engine, greedy (so two engines can agree), on the toy test split."""
    model_cfg = ModelConfig(name_or_path=str(model_dir), dtype="float32")
    engine_cfg = EngineConfig(backend=engine.backend, batch_size=N_PROBLEMS)
    eval_cfg = EvalConfig(benchmarks=(bench,), protocol="ssb-paper", temperature=0.0, max_new_tokens=128,
                          limit=N_PROBLEMS, grader_workers=0, bootstrap=200)  # fmt: skip
    base = evaluate(model_cfg, engine_cfg, eval_cfg, out / "base", engine=engine, label="base")
    lora = evaluate(model_cfg, engine_cfg, eval_cfg, out / "lora", adapter=adapter, engine=engine, label="lora")
    return base, lora


def _samples(res):
    (bench,) = res["benchmarks"].values()
    return {p["id"]: p["samples"][0] for p in bench["problems"]}


@pytest.mark.vllm
@pytest.mark.slow
def test_both_engines_give_identical_verdicts_for_identical_texts(toy_model_dir, vllm_engine, random_adapter, tmp_path):
    hf = make_engine(ModelConfig(name_or_path=str(toy_model_dir), dtype="float32"), EngineConfig(backend="hf"))
    try:
        hf_runs = _eval_pair(hf, toy_model_dir, "toy", tmp_path / "hf", random_adapter)
    finally:
        hf.close()
    vllm_runs = _eval_pair(vllm_engine, toy_model_dir, "toy", tmp_path / "vllm", random_adapter)
    same_text = 0
    for hf_res, vl_res in zip(hf_runs, vllm_runs, strict=True):
        a, b = _samples(hf_res), _samples(vl_res)
        assert a.keys() == b.keys() and len(a) == N_PROBLEMS
        for pid in a:
            if a[pid]["text"] == b[pid]["text"]:
                same_text += 1
                assert (a[pid]["pred"], a[pid]["correct"]) == (b[pid]["pred"], b[pid]["correct"]), pid
    # greedy fp32: nearly every text matches, so the check above is not vacuous
    assert same_text >= 0.75 * 2 * N_PROBLEMS
    # the adapter changes outputs in both engines (so both really apply it), and the paired comparison runs
    for base, lora in (hf_runs, vllm_runs):
        changed = sum(x["text"] != y["text"] for x, y in zip(_samples(base).values(), _samples(lora).values()))
        assert changed >= 1
        (t,) = compare(base, lora)["benchmarks"].values()
        assert t["n_problems"] == N_PROBLEMS and t["wins"] + t["losses"] + t["ties"] == N_PROBLEMS
