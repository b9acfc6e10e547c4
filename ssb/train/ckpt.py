"""Trainer checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

Layout of ``RUN_DIR/train/checkpoints/step-NNNNNN/``: ``adapter/`` (standard PEFT format, loadable for eval),
``trainable.safetensors`` (the exact trainable tensors, used to resume), ``optimizer.pt`` (under FSDP both are
``dcp/`` instead: ``torch.distributed.checkpoint`` shards, see ``ssb.train.parallel``), ``scheduler.pt``,
``rng-rank<R>.pt`` and ``state.json`` (step = data position, since the example stream is a function of the
step; see ``ssb.train.data``). A checkpoint is built in a temp directory and renamed into place, so a crash
never leaves a half-written ``step-*`` directory. Only tensors/primitives are saved, and loading uses
``torch.load(weights_only=True)``. ``RUN_DIR/train/state.json`` records what the checkpoints and adapter are made
from (:func:`train_state`): a run resumes only over its own, and moves any other aside (:func:`claim_train_dir`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ssb.config import SSBConfig, config_hash
from ssb.core.files import atomic_write_json, claim_dir, read_json, sha256_file, weights_stamp
from ssb.core.layout import RunLayout
from ssb.train.parallel import is_sharded, load_sharded, save_adapter, save_sharded


def train_state(cfg: SSBConfig, run_dir: Path, examples: Sequence | None = None) -> dict:
    """What a train directory's checkpoints and adapter are made from: the model (and its weight files), the
    ``train`` section and the inputs: each run directory's student pairs and teacher store (its fingerprint), or
    the token ids of ``examples`` given directly."""
    # what is only reported (trackers, log cadence) does not change the training: a new tracker resumes
    reported = replace(cfg.train, report_to=(), log_every=1)
    state = {
        "model": config_hash(cfg.model),
        "weights": weights_stamp(cfg.model.name_or_path),
        "train": config_hash(reported),
    }
    if examples is not None:
        ids = b"".join(ex.input_ids.cpu().numpy().tobytes() + b"|" for ex in examples)
        return {**state, "examples": hashlib.sha256(ids).hexdigest()[:16]}
    inputs = []
    for d in (run_dir, *cfg.train.extra_runs):
        layout = RunLayout(d)
        store = read_json(layout.store / "manifest.json") or {}
        inputs.append([sha256_file(layout.curate_student)[:16], store.get("fingerprint")])
    return {**state, "inputs": inputs}


def claim_train_dir(
    cfg: SSBConfig, run_dir: Path, examples: Sequence | None, *, resume: bool, rank: int, world: int
) -> bool:
    """Whether ``RUN_DIR/<train.output_subdir>`` holds this training's work to resume (``resume`` and the same
    :func:`train_state`); otherwise rank 0 moves what it holds aside (``train.stale-<time>/``, never deleted).
    Every rank gets rank 0's answer. Called once the examples and the model loaded."""
    ours = None
    if rank == 0:
        out_dir = RunLayout(run_dir).train(cfg.train.output_subdir)
        state = train_state(cfg, run_dir, examples)
        ours = claim_dir(out_dir, state, ["adapter", "checkpoints", "metrics.jsonl"], tag="ssb train", resume=resume)
    if world > 1:
        box = [ours]
        dist.broadcast_object_list(box, src=0)
        ours = box[0]
    return bool(ours)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    peft_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    rank: int,
    world: int,
    barrier=lambda: None,
    extra: dict | None = None,
) -> Path:
    """Write checkpoint ``step`` (all ranks call this; rank 0 writes model/optimizer, every rank its RNG)."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    save_adapter(peft_model, tmp / "adapter", rank=rank)  # collective under FSDP
    if is_sharded(peft_model):  # FSDP: every rank writes its shards (dcp/)
        save_sharded(tmp, peft_model, optimizer)
    elif rank == 0:
        save_file(trainable_state(peft_model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if rank == 0:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    barrier()
    if rank == 0:
        atomic_write_json(tmp / "state.json", {"step": step, "world_size": world, **(extra or {})})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    barrier()
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    done = [p for p in ckpt_root.glob("step-*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_checkpoint(path: Path, peft_model: torch.nn.Module, optimizer, scheduler, *, rank: int) -> dict:
    """Restore a checkpoint in place; returns its ``state.json``. Errors name the file that is wrong."""
    state = json.loads((path / "state.json").read_text())
    if is_sharded(peft_model):
        load_sharded(path, peft_model, optimizer)
    else:
        _load_whole(path, peft_model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def _load_whole(path: Path, peft_model: torch.nn.Module, optimizer) -> None:
    tensors = load_file(path / "trainable.safetensors")
    params = dict(peft_model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing or set(tensors) - set(params):
        raise ValueError(
            f"{path / 'trainable.safetensors'}: parameters do not match the model "
            f"(missing {missing[:3]}, unexpected {sorted(set(tensors) - set(params))[:3]}); "
            "was the LoRA config changed?"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
