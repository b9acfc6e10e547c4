"""Iterated bootstrapping (``rounds=R``): rollout -> curate -> capture -> train again, from the latest student.

Round 1 is the ordinary run in ``RUN_DIR``. Round ``r > 1`` runs in ``RUN_DIR/round<r>/``: its rollouts come from
the round ``r-1`` student, so the pairs are the problems that student still gets wrong part of the time; the
hinted teacher (curate, capture) stays the base model; and a fresh LoRA is trained on the base model over the
pairs of rounds ``1..r`` (``train.extra_runs``), as STaR does (Zelikman et al. 2022: retrain from the base on
everything collected, instead of stacking fine-tunes on few new examples). The teacher is the same model in
every round, so the earlier rounds' stored logits stay valid targets (train refuses stores of different
teachers or templates unless ``distill.allow_teacher_mix``). ``distill.source`` picks what each round
distils: robust solutions, the student's own samples (on-policy), or ``both`` (SSB in round 1, then on-policy
from the latest student: Lightning OPD's schedule). The student after round ``r`` is the base
with that LoRA merged into plain weights (``RunLayout.round(r).student``), so every stage loads it like any
model directory, with no LoRA plumbing. The paper's "iterations of logit generation and training".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ssb.config import SSBConfig
from ssb.core.layout import RunLayout
from ssb.core.models import merged_model

ROUND_STAGES = ("rollout", "curate", "capture", "train")


def ensure_student(cfg: SSBConfig, r: int) -> Path:
    """The merged student after round ``r`` (the base + that round's adapter), merged on first use."""
    layout = RunLayout(cfg.run_dir).round(r)
    adapter = layout.adapter(cfg.train.output_subdir)
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"round {r}: no trained adapter at {adapter} (run its train stage first)")
    return merged_model(cfg.model, adapter, layout.student)


def round_source(cfg: SSBConfig, r: int) -> str:
    """What round ``r`` distils: ``distill.source``, with ``both`` = robust (SSB) in round 1, on-policy after."""
    if cfg.distill.source == "both":
        return "robust" if r == 1 else "on_policy"
    return cfg.distill.source


def round_config(cfg: SSBConfig, r: int, stage: str) -> SSBConfig:
    """The config stage ``stage`` of round ``r`` runs with: its own directory; rollouts from the round ``r-1``
    student with the seed moved on by ``r-1``; what to distil (``round_source``); training over the pairs of
    every round so far."""
    if cfg.distill.source == "both":
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, source=round_source(cfg, r)))
    if r == 1:
        return cfg
    layout = RunLayout(cfg.run_dir)
    out = dataclasses.replace(cfg, run_dir=str(layout.round(r).root))
    if stage == "rollout":
        model = dataclasses.replace(cfg.model, name_or_path=str(ensure_student(cfg, r - 1)))
        out = dataclasses.replace(
            out, model=model, rollout=dataclasses.replace(cfg.rollout, seed=cfg.rollout.seed + r - 1)
        )
    if stage == "train":
        earlier = tuple(str(layout.round(k).root) for k in range(1, r))
        out = dataclasses.replace(out, train=dataclasses.replace(cfg.train, extra_runs=cfg.train.extra_runs + earlier))
    return out


def round_students(cfg: SSBConfig) -> list[tuple[str, Path]]:
    """``(label, merged student)`` for every round, merging as needed: ``round1`` .. ``round<R>``."""
    return [(f"round{r}", ensure_student(cfg, r)) for r in range(1, cfg.rounds + 1)]


def round_labels(cfg: SSBConfig, adapter: str | None = None) -> list[str] | None:
    """The students ``ssb run`` scores when it ran rounds and no other adapter is named: ``round1`` ..
    ``round<R>`` (:func:`round_students` merges them); None otherwise."""
    trained = str(RunLayout(cfg.run_dir).adapter(cfg.train.output_subdir))
    named = adapter or cfg.eval.adapter
    if cfg.rounds > 1 and named in (None, trained) and Path(trained, "adapter_config.json").exists():
        return [f"round{r}" for r in range(1, cfg.rounds + 1)]
    return None
