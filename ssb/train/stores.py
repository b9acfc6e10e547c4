"""The teacher stores a training run reads: opened and verified, of one kind (hidden or sparse), and, for hidden
stores, captured with the student's own frozen LM head (:mod:`ssb.store.hidden`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ssb.config import SSBConfig
from ssb.core.layout import RunLayout


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
        raise InputError(f"{b.path}/manifest.json: store_format {b.store_format} cannot train with "
                         f"{a.store_format} store {a.path} (hidden and sparse stores take different losses); "
                         "recapture one with the other's capture.store_format")  # fmt: skip
