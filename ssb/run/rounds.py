"""Iterated bootstrapping (``rounds=R``): rollout -> curate -> capture -> train again, from the latest student.

Round 1 is the ordinary run in ``RUN_DIR``. Round ``r > 1`` runs in ``RUN_DIR/round<r>/``: its rollouts come from
the round ``r-1`` student, so the pairs are the problems that student still gets wrong part of the time; the
hinted teacher (curate, capture) stays the base model; and a fresh LoRA is trained on the base model over the
pairs of rounds ``1..r`` (``train.extra_runs``), as STaR does (Zelikman et al. 2022: retrain from the base on
everything collected, instead of stacking fine-tunes on few new examples). The teacher is the same model in
every round, so the earlier rounds' stored logits stay valid targets. The student after round ``r`` is the base
with that LoRA merged into plain weights (``RUN_DIR[/round<r>]/student``), so every stage loads it like any
model directory, with no LoRA plumbing. The paper's "iterations of logit generation and training".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ssb.config import SSBConfig
from ssb.pipeline import Stage

ROUND_STAGES = ("rollout", "curate", "capture", "train")


def round_dir(cfg: SSBConfig, r: int) -> Path:
    return Path(cfg.run_dir) if r == 1 else Path(cfg.run_dir) / f"round{r}"


def student_path(cfg: SSBConfig, r: int) -> Path:
    """Where the merged student after round ``r`` lives (made by :func:`ensure_student`)."""
    return round_dir(cfg, r) / "student"


def merged_model(base: str, dtype: str, adapter: Path, out: Path) -> Path:
    """``base`` + the LoRA at ``adapter`` merged into plain weights saved at ``out``.

    Same function as base + LoRA (W + scale * B @ A) up to rounding in ``dtype``. ``out/merged_from.json``
    records the base and the adapter's weights hash: an existing merge is reused only when both match, so a
    retrained adapter is merged again. Written to a temporary directory and renamed, so a killed merge leaves
    nothing half-written.
    """
    import shutil

    from ssb.files import atomic_write_json, sha256_file

    weights = adapter / "adapter_model.safetensors"
    source = {"base": str(base), "dtype": dtype, "adapter": str(adapter), "adapter_sha256": sha256_file(weights)}
    marker = out / "merged_from.json"
    if marker.exists() and json.loads(marker.read_text()) == source:
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssb.train_model import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # "auto": the dtype stages will load
    model = AutoModelForCausalLM.from_pretrained(base, dtype=resolve_dtype(dtype, device))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    atomic_write_json(tmp / "merged_from.json", source)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def ensure_student(cfg: SSBConfig, r: int) -> Path:
    """The merged student after round ``r`` (the base + that round's adapter), merged on first use."""
    adapter = round_dir(cfg, r) / cfg.train.output_subdir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"round {r}: no trained adapter at {adapter} (run its train stage first)")
    return merged_model(cfg.model.name_or_path, cfg.model.dtype, adapter, student_path(cfg, r))


def round_config(cfg: SSBConfig, r: int, stage: str) -> SSBConfig:
    """The config stage ``stage`` of round ``r`` runs with: its own directory; rollouts from the round ``r-1``
    student with the seed moved on by ``r-1``; training over the pairs of every round so far."""
    if r == 1:
        return cfg
    out = dataclasses.replace(cfg, run_dir=str(round_dir(cfg, r)))
    if stage == "rollout":
        model = dataclasses.replace(cfg.model, name_or_path=str(ensure_student(cfg, r - 1)))
        out = dataclasses.replace(
            out, model=model, rollout=dataclasses.replace(cfg.rollout, seed=cfg.rollout.seed + r - 1)
        )
    if stage == "train":
        earlier = tuple(str(round_dir(cfg, k)) for k in range(1, r))
        out = dataclasses.replace(out, train=dataclasses.replace(cfg.train, extra_runs=cfg.train.extra_runs + earlier))
    return out


def _round_stage(stage: Stage, r: int) -> Stage:
    def run(cfg: SSBConfig) -> int:
        return stage.run(round_config(cfg, r, stage.name))

    return Stage(f"{stage.name}@{r}", stage.sections, run)


def expand(plan: list[Stage], rounds: int) -> list[Stage]:
    """``plan`` with rounds 2..R of its rollout..train stages inserted before its ``eval`` stage (at the end
    without one). Stage hashes are cumulative, so raising R keeps every finished stage of the earlier rounds."""
    if rounds < 1:
        raise ValueError(f"rounds: expected >= 1, got {rounds}")
    if rounds == 1:
        return plan
    names = [s.name for s in plan]
    missing = [n for n in ROUND_STAGES if n not in names]
    if missing:
        raise ValueError(f"rounds={rounds} needs the stages {list(ROUND_STAGES)} in the plan; missing {missing}")
    by_name = {s.name: s for s in plan}
    extra = [_round_stage(by_name[n], r) for r in range(2, rounds + 1) for n in ROUND_STAGES]
    cut = names.index("eval") if "eval" in names else len(plan)
    return [*plan[:cut], *extra, *plan[cut:]]


def round_students(cfg: SSBConfig) -> list[tuple[str, Path]]:
    """``(label, merged student)`` for every round, merging as needed: ``round1`` .. ``round<R>``."""
    return [(f"round{r}", ensure_student(cfg, r)) for r in range(1, cfg.rounds + 1)]
