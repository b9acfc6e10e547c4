"""Iterated bootstrapping (``rounds=R``): the stage plan, its hashes, and a reduced two-round ``ssb run``."""

import json
from pathlib import Path

import pytest
import yaml
from run_helpers import run_two_rounds

from ssb.config import load_config
from ssb.run.plan import STAGES, expand
from ssb.run.rounds import ensure_student
from ssb.run.runner import stage_hashes

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"


def test_rounds_repeat_rollout_to_train_before_eval():
    names = [s.name for s in expand(STAGES, 3)]
    assert names == ["rollout", "curate", "capture", "train",
                     "rollout@2", "curate@2", "capture@2", "train@2",
                     "rollout@3", "curate@3", "capture@3", "train@3", "eval"]  # fmt: skip
    assert expand(STAGES, 1) is STAGES
    with pytest.raises(ValueError, match="rounds: expected >= 1, got 0"):
        expand(STAGES, 0)
    with pytest.raises(ValueError, match=r"missing \['train'\]"):
        expand([s for s in STAGES if s.name != "train"], 2)


def test_raising_rounds_keeps_the_finished_rounds():
    cfg = load_config(CONFIG)
    two, three = stage_hashes(cfg, expand(STAGES, 2)), stage_hashes(cfg, expand(STAGES, 3))
    for name in ["rollout", "curate", "capture", "train", "rollout@2", "curate@2", "capture@2", "train@2"]:
        assert two[name] == three[name], name
    assert two["eval"] != three["eval"]
    assert len(set(three.values())) == len(three)  # every round's stages hash apart


def test_a_round_without_its_adapter_says_so(tmp_path):
    cfg = load_config(CONFIG, [f"run_dir={tmp_path}", "rounds=2"])
    with pytest.raises(FileNotFoundError, match=r"round 1: no trained adapter at .*train/adapter"):
        ensure_student(cfg, 1)


REDUCED = ["data.limit=16", "curate.target_pairs=6", "curate.attempts=4", "train.max_steps=2", "train.batch_size=4",
           "eval.limit=8", "eval.n=1", "eval.bootstrap=100", "rounds=2"]  # fmt: skip


def _model_of(stage_dir: Path) -> str:
    return yaml.safe_load((stage_dir / "config.yaml").read_text())["model"]["name_or_path"]


@pytest.mark.vllm
@pytest.mark.slow
def test_two_rounds_roll_out_from_the_student_and_train_on_every_round(tmp_path):
    out = tmp_path / "run"
    run_two_rounds(out, CONFIG, REDUCED)

    base = _model_of(out / "rollout")
    round2 = out / "round2"
    assert _model_of(round2 / "rollout") == str(out / "student")  # rollouts from the round-1 student
    assert _model_of(round2 / "curate") == base  # the hinted teacher stays the base model
    train2 = yaml.safe_load((round2 / "train" / "config.yaml").read_text())
    assert train2["model"]["name_or_path"] == base  # a fresh LoRA on the base (STaR-style) ...
    assert train2["train"]["extra_runs"] == [str(out)]  # ... over the pairs of rounds 1 and 2
    pairs = sum(len((d / "curate" / "student.jsonl").read_text().splitlines()) for d in (out, round2))
    facts = json.loads((round2 / "train" / "train_facts.json").read_text())
    assert facts["examples"] == pairs, facts
    assert (round2 / "train" / "adapter" / "adapter_config.json").exists()
    assert (round2 / "student" / "config.json").exists()
    seeds = [yaml.safe_load((d / "rollout" / "config.yaml").read_text())["rollout"]["seed"] for d in (out, round2)]
    assert seeds[1] == seeds[0] + 1
    for label in ("base", "round1", "round2"):
        results = json.loads((out / "eval" / label / "results.json").read_text())
        assert 0.0 <= results["benchmarks"]["toy"]["aggregates"]["pass@k"]["1"]["value"] <= 1.0
    # the round-2 student is not the round-1 student: merging its LoRA changed the weights
    from safetensors.torch import load_file

    w1, w2 = (load_file(str(p / "model.safetensors")) for p in (out / "student", round2 / "student"))
    assert any((w1[k] - w2[k]).abs().max() > 0 for k in w1)


def test_merged_student_is_redone_when_its_adapter_changes(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ssb.config import ModelConfig
    from ssb.core.models import merged_model
    from ssb.toy.world import asset_path

    def save_adapter(seed: int) -> Path:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(asset_path(), dtype=torch.float32)
        lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)  # random B: a real change
        get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
        return tmp_path / "adapter"

    out = tmp_path / "student"
    base = ModelConfig(name_or_path=str(asset_path()), dtype="float32")
    merged_model(base, save_adapter(0), out)
    first = load_file(str(out / "model.safetensors"))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    merged_model(base, tmp_path / "adapter", out)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # same adapter: the merge is reused
    merged_model(base, save_adapter(1), out)
    second = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # retrained adapter: merged again
    assert not (tmp_path / "student.tmp").exists()
