"""docs/RECIPES.md's recipe, run: ``sparse_kd_loss`` inside a Hugging Face ``Trainer.compute_loss`` with a PEFT
LoRA on the toy model and a random sparse teacher; the loss is finite and the LoRA weights move."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "ssb" / "assets" / "toy"


def recipe_source() -> str:
    """The recipe's code block, exactly as docs/RECIPES.md shows it."""
    text = (REPO / "docs" / "RECIPES.md").read_text()
    return re.search(r"```python\n(from transformers import Trainer.*?)```", text, re.S).group(1)


class Targets(torch.utils.data.Dataset):
    """n sequences of length L with a random sparse teacher (k ids, log-probs leaving tail mass) on the reply rows."""

    def __init__(self, n: int, length: int, vocab: int, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(length)])  # (L, k) distinct
            probs = torch.softmax(torch.randn(length, k, generator=g) * 2, -1) * 0.9  # 10% teacher tail mass
            mask = torch.zeros(length, dtype=torch.bool)
            mask[length // 2 : -1] = True  # the reply half (the last position predicts nothing)
            self.rows.append({"input_ids": torch.randint(0, vocab, (length,), generator=g),
                              "attention_mask": torch.ones(length, dtype=torch.long),
                              "topk_ids": ids, "topk_logprobs": probs.log(), "kd_mask": mask})  # fmt: skip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def test_recipe_trains_a_lora_with_the_sparse_kd_loss(tmp_path):
    pytest.importorskip("accelerate")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    torch.manual_seed(0)
    namespace: dict = {}
    exec(recipe_source(), namespace)  # noqa: S102 - the documented recipe itself, so the test cannot drift from it
    base = AutoModelForCausalLM.from_pretrained(TOY, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             remove_unused_columns=False, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True)  # fmt: skip
    data = Targets(6, 12, base.config.vocab_size, k=5)
    trainer = namespace["SparseKDTrainer"](model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), losses
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert before and moved and all("lora_" in n for n in before), (len(before), len(moved))
    assert any("lora_B" in n for n in moved)  # B starts at zero: only a real gradient moves it


def test_kernels_docstring_shows_the_same_recipe():
    import ssb_kernels

    doc = ssb_kernels.__doc__
    for line in recipe_source().splitlines()[3:]:  # the class (the imports are the module's own)
        assert line.strip() in doc, line
