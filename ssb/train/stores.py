"""The teacher stores a training run reads: opened and verified, of one kind (hidden or sparse), from one teacher
(unless ``distill.allow_teacher_mix``), and, for hidden stores, captured with the student's own frozen LM head
(:mod:`ssb.store.hidden`); and the student-view examples built from them (:func:`load_examples`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ssb.config import SSBConfig
from ssb.core.layout import RunLayout
from ssb.train.data import Example


def open_stores(cfg: SSBConfig, run_dir: Path) -> list:
    """The teacher stores of ``RUN_DIR`` and of every ``train.extra_runs`` directory (verified), in that order."""
    from ssb.store import TeacherStore

    return [TeacherStore(RunLayout(d).store) for d in (run_dir, *cfg.train.extra_runs)]


def check_hidden_heads(stores, peft_model: torch.nn.Module) -> None:
    """A hidden store trains only a student whose frozen LM head is the captured one (``ssb.store.hidden``): not
    another model's, a quantised or adapted one (LoRA on ``lm_head``, ``modules_to_save``); else one line, exit 2."""
    from ssb.store.hidden import check_head

    for store in stores:
        if store.store_format == "hidden":
            check_head(store.manifest, peft_model.get_base_model())


def check_one_kind(stores) -> None:
    """Hidden stores (the exact teacher) and sparse ones (exact or compact top-k) train apart: one loss per run."""
    from ssb.core.files import InputError

    kinds = [store.store_format == "hidden" for store in stores]
    if any(kinds) and not all(kinds):
        a, b = stores[0], stores[kinds.index(not kinds[0])]
        raise InputError(
            f"{b.path}/manifest.json: store_format {b.store_format} cannot train with "
            f"{a.store_format} store {a.path} (hidden and sparse stores take different losses); "
            "recapture one with the other's capture.store_format"
        )


def load_examples(cfg: SSBConfig, run_dir: Path, stores: list | None = None) -> list[Example]:
    """Student-view examples with teacher targets from ``RUN_DIR/capture`` + ``RUN_DIR/curate/student.jsonl``,
    then those of every ``train.extra_runs`` directory (the earlier rounds of ``rounds=R``), in that order."""
    from ssb.core.models import load_tokenizer
    from ssb.store import build_student_examples

    tokenizer = load_tokenizer(cfg.model)
    examples: list[Example] = []
    stores = open_stores(cfg, run_dir) if stores is None else stores
    if not cfg.distill.allow_teacher_mix:
        check_one_teacher(stores)
    check_one_kind(stores)
    for d, store in zip((run_dir, *cfg.train.extra_runs), stores):
        examples += build_student_examples(store, RunLayout(d).curate_student, tokenizer, cfg.train.kd_temperature)
    return examples


def check_one_teacher(stores) -> None:
    """Every store's targets come from one teacher and template (Lightning OPD: a teacher that changes between
    stages adds an irreducible bias), compared on the identity keys both manifests record; else InputError."""
    from ssb.core.files import InputError

    first = stores[0]
    a = first.manifest.get("teacher") or {"model": first.manifest["model"]["id"]}
    for store in stores[1:]:
        b = store.manifest.get("teacher") or {"model": store.manifest["model"]["id"]}
        diff = sorted(key for key in a.keys() & b.keys() if a[key] != b[key])
        if diff:
            raise InputError(
                f"{store.path}/manifest.json: teacher {', '.join(diff)} differ from {first.path} "
                f"({', '.join(f'{k}: {b[k]!r} vs {a[k]!r}' for k in diff)}); set "
                "distill.allow_teacher_mix=true to train on both anyway"
            )
