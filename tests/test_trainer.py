"""Trainer tests on a tiny random Qwen2 (CPU): loss path, accumulation, resume, adapter export, QLoRA, SFT.

Teacher targets come from a second random model of the same vocabulary (top-k at T = 1 with exact c_T),
so the student has something real to fit. The oracle for step-0 losses runs the full model WITH its LM
head on each example separately (no packing) and evaluates SPEC section 2 in float64.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_qwen import tiny_llama_untied, tiny_qwen

from ssb.config import load_config
from ssb.train import train
from ssb.train.data import collate
from ssb.train.model import StudentBody, attach_lora, build_base

VOCAB, K, T = 96, 8, 2.0


@dataclass
class Ex:
    """Same fields as ``ssb.store.DistillExample`` (what the trainer reads)."""

    input_ids: torch.Tensor
    reply_start: int
    token_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    lse_t: torch.Tensor


def tiny_model_dir(root: Path, seed: int) -> Path:
    out = root / f"tiny-{seed}"
    tiny_qwen(VOCAB, seed, max_positions=256).save_pretrained(out)
    return out


def make_examples(teacher_dir: Path, n: int, seed: int = 0) -> list[Ex]:
    """n examples with random prompts/replies; targets = the teacher model's top-k log-probs at T=1."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(4, 10, (1,), generator=gen))
        r = int(torch.randint(3, 9, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (p + r,), generator=gen)
        with torch.no_grad():
            logp = torch.log_softmax(teacher(ids[None]).logits[0].double(), -1)[p - 1 : p - 1 + r]  # (R, V)
        vals, top = logp.topk(K, -1)
        out.append(
            Ex(
                input_ids=ids[:-1],
                reply_start=p - 1,
                token_ids=ids[p:],
                topk_ids=top.int(),
                topk_logprobs=vals.float(),
                lse_t=torch.logsumexp(logp / T, -1).float(),  # exact c_T over the full vocabulary
            )
        )
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    student, teacher = tiny_model_dir(root, 0), tiny_model_dir(root, 1)
    return {"root": root, "student": student, "examples": make_examples(teacher, 16)}


def make_cfg(model_dir: Path, run_dir: Path, **train):
    base = dict(lora_r=8, lora_alpha=16, lr=1e-2, batch_size=2, max_steps=4, warmup_ratio=0.0, kd_temperature=T)
    base.update(train)
    overrides = [f"model.name_or_path={model_dir}", "model.dtype=float32", f"run_dir={run_dir}"]
    overrides += [f"train.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]
    return load_config(None, overrides)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def oracle_losses(model_dir: Path, examples: list[Ex]) -> tuple[float, float]:
    """Mean per-token KD (tail variant, T^2-scaled) and CE from full logits, in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    kd = ce = 0.0
    n = 0
    for ex in examples:
        with torch.no_grad():
            z = model(ex.input_ids[None]).logits[0, ex.reply_start :].double()  # (R, V)
        logp = torch.log_softmax(z / T, -1)
        ids = ex.topk_ids.long()
        logq = ex.topk_logprobs.double() / T - ex.lse_t.double()[:, None]
        lp = logp.gather(1, ids)
        qt = 1 - logq.exp().sum(-1)
        pt = 1 - lp.exp().sum(-1)
        kd += float(((logq.exp() * (logq - lp)).sum(-1) + qt * (qt.log() - pt.log())).sum()) * T * T
        ce -= float(torch.log_softmax(z, -1).gather(1, ex.token_ids.long()[:, None]).sum())
        n += ex.token_ids.numel()
    return kd / n, ce / n


def test_packed_rows_match_separate_forward(world):
    """Packing with per-example position ids gives the same reply hidden states as separate forwards."""
    cfg = make_cfg(world["student"], world["root"] / "unused")
    for attn in ("sdpa", "eager"):
        tc = cfg.train.__class__(**{**vars(cfg.train), "attn_implementation": attn})
        base, _ = build_base(cfg.model, tc, torch.device("cpu"))
        body = StudentBody(attach_lora(base, tc)).eval()
        exs = world["examples"][:3]
        with torch.no_grad():
            for packing in (True, False):
                b = collate(exs, packing=packing)
                h = body(b.input_ids, b.position_ids, b.attention_mask).reshape(-1, 32)[b.rows]
                ref = torch.cat(
                    [
                        body(e.input_ids[None], torch.arange(e.input_ids.numel())[None], None)[0, e.reply_start :]
                        for e in exs
                    ]
                )
                torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5, msg=f"{attn} packing={packing}")


def test_step0_losses_equal_full_logit_reference(world, tmp_path):
    """Step-0 KD and CE (LoRA B = 0, so the base model) equal the dense float64 reference on the same batch."""
    cfg = make_cfg(world["student"], tmp_path, batch_size=8, max_steps=1, ce_weight=1.0)
    train(cfg, tmp_path, examples=world["examples"][:8])
    m = metrics(tmp_path)[0]
    from ssb.train.data import stream_indices

    batch = [world["examples"][i] for i in stream_indices(8, 0, 8, cfg.train.seed)]
    kd, ce = oracle_losses(world["student"], batch)
    assert m["kd_loss"] == pytest.approx(kd, rel=1e-5)
    assert m["ce_loss"] == pytest.approx(ce, rel=1e-5)
    assert m["distilled_tokens"] == sum(e.token_ids.numel() for e in batch)
    # the stored top-k's teacher mass at the training T (exact c_T) and at T = 1
    lp, lse = torch.cat([e.topk_logprobs for e in batch]).double(), torch.cat([e.lse_t for e in batch]).double()
    assert m["teacher_topk_mass"] == pytest.approx(float((lp / T - lse[:, None]).exp().sum(-1).mean()), rel=1e-6)
    assert m["teacher_topk_mass_t1"] == pytest.approx(float(lp.exp().sum(-1).mean()), rel=1e-6)
    assert m["teacher_topk_mass"] < m["teacher_topk_mass_t1"]


def test_untied_llama_head_is_the_real_lm_head(world, tmp_path):
    """An untied Llama: the trainer distils through ``lm_head.weight``, not the input embedding, so step-0 losses
    equal the full model's own logits (which a tied-head assumption would get wrong) and training still learns."""
    model_dir = tmp_path / "llama-untied"
    tiny_llama_untied(VOCAB, 3, max_positions=256).save_pretrained(model_dir)
    cfg = make_cfg(model_dir, tmp_path / "run", batch_size=8, max_steps=1, ce_weight=1.0)
    train(cfg, tmp_path / "run", examples=world["examples"][:8])
    m = metrics(tmp_path / "run")[0]
    from ssb.train.data import stream_indices

    batch = [world["examples"][i] for i in stream_indices(8, 0, 8, cfg.train.seed)]
    kd, ce = oracle_losses(model_dir, batch)
    assert m["kd_loss"] == pytest.approx(kd, rel=1e-5)
    assert m["ce_loss"] == pytest.approx(ce, rel=1e-5)
    cfg = make_cfg(model_dir, tmp_path / "run2", max_steps=20, batch_size=4)
    train(cfg, tmp_path / "run2", examples=world["examples"])
    losses = [r["kd_loss"] for r in metrics(tmp_path / "run2")]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_training_lowers_kd_loss(world, tmp_path, qlora):
    cfg = make_cfg(world["student"], tmp_path, max_steps=30, batch_size=4, qlora=qlora)
    adapter = train(cfg, tmp_path, examples=world["examples"][:8])
    m = metrics(tmp_path)
    keys = {"kd_loss", "ce_loss", "grad_norm", "lr", "distilled_tokens_per_s", "step_time_s", "peak_memory_mb"}
    assert keys | {"completion_length", "teacher_topk_mass"} <= set(m[0])
    assert 0 < m[0]["teacher_topk_mass"] <= 1 and m[0]["completion_length"] > 1
    facts = json.loads((tmp_path / "train" / "train_facts.json").read_text())
    assert facts["quantised_linear_layers" if qlora else "qlora"] == (14 if qlora else False)  # 7 per layer
    losses = [r["kd_loss"] for r in m]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    # the first epoch (steps 0-1) vs the last epoch (steps 28-29) over the same 8 examples
    assert sum(losses[-2:]) < 0.7 * sum(losses[:2]), losses
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (tmp_path / "train" / "config.yaml").is_file()


def test_sft_control_trains_ce_only(world, tmp_path):
    cfg = make_cfg(world["student"], tmp_path, max_steps=12, batch_size=4, kd_weight=0.0, ce_weight=1.0)
    train(cfg, tmp_path, examples=world["examples"][:4])
    m = metrics(tmp_path)
    assert all(r["kd_loss"] == 0.0 for r in m)
    assert m[-1]["ce_loss"] < 0.7 * m[0]["ce_loss"]


def _trainable(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_grad_accumulation_4x2_equals_1x8(world, tmp_path, packing):
    """Loss is normalised once per window: 4 micro-batches of 2 give the update of 1 batch of 8."""
    exs = world["examples"][:8]
    runs = {}
    for name, (bs, acc) in {"4x2": (2, 4), "1x8": (8, 1)}.items():
        cfg = make_cfg(world["student"], tmp_path / name, batch_size=bs, grad_accum=acc, max_steps=3, packing=packing)
        train(cfg, tmp_path / name, examples=exs)
        runs[name] = (metrics(tmp_path / name), _trainable(tmp_path / name))
    (m_a, w_a), (m_b, w_b) = runs["4x2"], runs["1x8"]
    for a, b in zip(m_a, m_b, strict=True):
        assert a["kd_loss"] == pytest.approx(b["kd_loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Adam divides by sqrt(v): a gradient element at fp32-noise level can move by a small fraction of lr
    for key in w_a:
        torch.testing.assert_close(w_a[key], w_b[key], atol=1e-2 * 1e-2, rtol=1e-4)


def test_resume_reproduces_uninterrupted_run(world, tmp_path):
    exs = world["examples"][:8]
    full, cut = tmp_path / "full", tmp_path / "cut"
    cfg_full = make_cfg(world["student"], full, max_steps=6, save_every=2, schedule="cosine", warmup_ratio=0.2)
    cfg_cut = make_cfg(world["student"], cut, max_steps=6, save_every=2, schedule="cosine", warmup_ratio=0.2)
    train(cfg_full, full, examples=exs)
    train(cfg_cut, cut, examples=exs, stop_after=3)  # pre-empted after step 3; last checkpoint is step 2
    assert not (cut / "train" / "adapter").exists()
    assert sorted(p.name for p in (cut / "train" / "checkpoints").iterdir()) == ["step-000002"]
    train(cfg_cut, cut, examples=exs, resume=True)
    keys = ("step", "loss", "kd_loss", "grad_norm", "lr", "distilled_tokens")
    assert [[r[k] for k in keys] for r in metrics(cut)] == [[r[k] for k in keys] for r in metrics(full)]
    w_full, w_cut = _trainable(full), _trainable(cut)
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)
    # another batch size is other settings: the finished run is moved aside, whole, and training starts over
    before = {p.relative_to(cut / "train"): p.read_bytes() for p in (cut / "train").rglob("*") if p.is_file()}
    other_batch = make_cfg(world["student"], cut, max_steps=6, save_every=2, batch_size=4)
    train(other_batch, cut, examples=exs, resume=True)
    (aside,) = cut.glob("train.stale-*")
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == before
    assert metrics(cut)[0]["step"] == 0 and len(metrics(cut)) == 6


def test_saved_adapter_reloads_and_reproduces_logits(world, tmp_path):
    """The PEFT export reloads with PeftModel.from_pretrained and gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(world["student"], tmp_path, max_steps=4, save_every=4)
    adapter = train(cfg, tmp_path, examples=world["examples"][:8])
    # the trained tensors, exactly as the optimizer left them (checkpoint at the final step)
    trained = load_file(tmp_path / "train" / "checkpoints" / "step-000004" / "trainable.safetensors")
    base, _ = build_base(cfg.model, cfg.train, torch.device("cpu"))
    ref = attach_lora(base, cfg.train).eval()
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for k, v in trained.items():
            params[k].copy_(v)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world["student"], dtype=torch.float32), adapter
    ).eval()
    plain = AutoModelForCausalLM.from_pretrained(world["student"], dtype=torch.float32).eval()
    ids = world["examples"][0].input_ids[None]
    with torch.no_grad():
        z_ref, z_new, z_base = ref(ids).logits, reloaded(ids).logits, plain(ids).logits
    torch.testing.assert_close(z_new, z_ref, atol=1e-6, rtol=1e-6)
    assert (z_new - z_base).abs().max() > 1e-3  # the adapter is not a no-op


def test_a_tracker_or_log_cadence_does_not_change_what_a_train_dir_resumes_over(tmp_path):
    """train_state decides whether ``--resume`` continues a train directory or moves it aside: reporting
    (train.report_to, train.log_every) is not the training, the learning rate is."""
    from dataclasses import replace

    from ssb.train.ckpt import train_state

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    base = train_state(cfg, tmp_path, examples=[])
    reported = replace(cfg, train=replace(cfg.train, report_to=("tensorboard",), log_every=7))
    assert train_state(reported, tmp_path, examples=[]) == base
    other = replace(cfg, train=replace(cfg.train, lr=cfg.train.lr * 2))
    assert train_state(other, tmp_path, examples=[]) != base
