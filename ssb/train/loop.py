"""``ssb train``: distil the stored sparse teacher into a LoRA/QLoRA student (bare question -> reply).

``setup()`` then one flat loop (lr, data, forward/backward with accumulation, clip, step, log,
checkpoint). The loss is normalised in exactly one place: by the number of distilled tokens of the
whole accumulation window over all ranks, so accumulation 4x2 equals 1x8 and 2 DDP ranks equal 1
process with the same global batch.

Inputs: ``RUN_DIR/curate/student.jsonl`` and the teacher store ``RUN_DIR/capture/``. Outputs under
``RUN_DIR/train/`` (``train.output_subdir``): ``adapter/`` (standard PEFT format), ``checkpoints/``,
``metrics.jsonl``, ``config.yaml`` (paths in :class:`ssb.core.layout.RunLayout`) and ``state.json`` (what they were
made from: a directory of other settings or inputs, or any with resume off, is moved aside to ``train.stale-<time>/``).
Runs unchanged under ``torchrun --nproc_per_node N -m ssb train ...`` (DDP, or FSDP2 with ``train.parallel=fsdp``;
gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ssb.config import SSBConfig, config_to_dict, save_config
from ssb.core.files import append_jsonl, atomic_write_json, atomic_write_jsonl, read_jsonl
from ssb.core.layout import RunLayout
from ssb.core.output import facts_table
from ssb.core.tracking import open_tracker
from ssb.train.ckpt import claim_train_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from ssb.train.data import (
    Example,
    TeacherMass,
    check_examples,
    collate,
    rank_micro_batches,
    steps_for,
    stream_indices,
    teacher_mass_for,
)
from ssb.train.model import attach_lora, build_base, distill_loss_sums, lm_head_weight
from ssb.train.parallel import save_adapter, wrap_body
from ssb.train.stores import check_hidden_heads, load_examples, open_stores


@dataclass
class Setup:
    """Everything the loop needs; built once by :func:`setup`."""

    cfg: SSBConfig
    out_dir: Path
    device: torch.device
    rank: int
    world: int
    peft_model: torch.nn.Module
    body: torch.nn.Module  # StudentBody; DDP-wrapped or FSDP2-sharded when world > 1 (ssb.train.parallel)
    weight: torch.Tensor  # (V, H) frozen LM head
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    examples: Sequence[Example]
    teacher_mass: TeacherMass
    lengths: list[int]
    global_batch: int
    total_steps: int
    start_step: int
    facts: dict

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device) from torchrun's environment; a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, device


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """Linear warmup (the first step already has lr > 0), then cosine/linear decay to 0, or constant."""
    warmup = round(warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if schedule == "linear" else 1.0

    return f


def make_optimizer(params: list, name: str, lr: float, weight_decay: float, device: torch.device):
    """AdamW: torch's (fused kernel on CUDA), or bitsandbytes' paged 8-bit AdamW (CUDA only)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    if name == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ValueError("train.optimizer=paged_adamw_8bit needs a CUDA device; use adamw on CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise AssertionError(f"train.optimizer={name!r} passed the config's choices")  # load_config checks them


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process peak RSS


def setup(cfg: SSBConfig, run_dir: Path, *, resume: bool = False, examples: Sequence[Example] | None = None) -> Setup:
    """Model, adapters, optimizer, schedule, data and (with ``resume``) the latest checkpoint's state."""
    tc = cfg.train
    rank, world, device = init_distributed()
    layout = RunLayout(run_dir)
    out_dir = layout.train(tc.output_subdir)
    from_disk = examples is None
    stores = open_stores(cfg, run_dir) if from_disk else []
    if from_disk:
        examples = load_examples(cfg, run_dir, stores)
    check_examples(examples)

    torch.manual_seed(tc.seed)  # identical LoRA init on every rank
    base, facts = build_base(cfg.model, tc, device)
    peft_model = attach_lora(base, tc)
    check_hidden_heads(stores, peft_model)
    teacher_mass = teacher_mass_for(examples, stores, tc.kd_temperature, cfg.capture.k)
    if teacher_mass.k:
        facts["teacher_mass"] = f"top-{teacher_mass.k} at T={tc.kd_temperature} ({teacher_mass.key})"
    peft_model.train()
    random.seed(tc.seed + rank)  # per-rank RNG streams (dropout) from here on; the data order is rank-free
    torch.manual_seed(tc.seed + rank)
    body = wrap_body(peft_model, tc.parallel, world, device)  # the optimizer below gets the sharded parameters
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    facts["trainable_params"] = sum(p.numel() for p in trainable)
    facts["world_size"], facts["parallel"] = world, tc.parallel if world > 1 else "none"
    facts["examples"] = len(examples)
    optimizer = make_optimizer(trainable, tc.optimizer, tc.lr, tc.weight_decay, device)
    global_batch = tc.batch_size * tc.grad_accum * world
    total_steps = steps_for(len(examples), tc.epochs, global_batch, tc.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, tc.warmup_ratio, tc.schedule))

    # ---- the output directory: resume only over work of these settings and inputs; any other is moved aside
    #      (train.stale-<time>/) now that the examples and the model loaded, never deleted
    start_step = 0
    ours = claim_train_dir(cfg, run_dir, None if from_disk else examples, resume=resume, rank=rank, world=world)
    ckpt = latest_checkpoint(layout.checkpoints(tc.output_subdir)) if ours else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, peft_model, optimizer, scheduler, rank=rank)
        start_step = int(state["step"])
        if state.get("global_batch", global_batch) != global_batch:
            raise ValueError(
                f"{ckpt}/state.json: saved with global batch {state['global_batch']}, now {global_batch} "
                "(batch_size x grad_accum x ranks): the data position would not match; resume with the same batch"
            )
    metrics = layout.metrics(tc.output_subdir)
    if rank == 0 and ours and metrics.is_file():  # drop log lines the resumed run will redo
        kept = [r for r in read_jsonl(metrics, tolerate_partial_tail=True) if r["step"] < start_step]
        atomic_write_jsonl(metrics, kept)
    if world > 1:
        dist.barrier()
    facts["resumed_from"] = str(ckpt) if ckpt is not None else None
    return Setup(
        cfg=cfg,
        out_dir=out_dir,
        device=device,
        rank=rank,
        world=world,
        peft_model=peft_model,
        body=body,
        weight=lm_head_weight(peft_model),
        optimizer=optimizer,
        scheduler=scheduler,
        examples=examples,
        teacher_mass=teacher_mass,
        lengths=[int(ex.input_ids.numel()) for ex in examples],
        global_batch=global_batch,
        total_steps=total_steps,
        start_step=start_step,
        facts=facts,
    )


def train(
    cfg: SSBConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    examples: Sequence[Example] | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train and return the final adapter directory (``RUN_DIR/<train.output_subdir>/adapter``, PEFT format).

    ``examples`` overrides loading from the run directory (tests, benchmarks); ``stop_after`` ends the run
    cleanly after that many optimizer steps without writing the final adapter (a simulated pre-emption).
    """
    s = setup(cfg, Path(run_dir), resume=resume, examples=examples)
    tc, dev = cfg.train, s.device
    layout, sub = RunLayout(run_dir), cfg.train.output_subdir
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    trainable = [p for p in s.peft_model.parameters() if p.requires_grad]
    tracker = _open_outputs(s, run_dir)
    bar = tqdm(total=s.total_steps, initial=s.start_step, desc="train", disable=not s.is_main, dynamic_ncols=True)
    stopped = False
    for step in range(s.start_step, s.total_steps):
        t0 = time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        # ---- data: this step's global examples -> this rank's micro-batches
        indices = stream_indices(len(s.examples), step * s.global_batch, s.global_batch, tc.seed)
        micro = rank_micro_batches(
            indices, s.lengths, rank=s.rank, world=s.world, batch_size=tc.batch_size, token_budget=tc.micro_token_budget
        )
        batches = [collate([s.examples[i] for i in mb], packing=tc.packing) for mb in micro]

        # ---- loss normaliser (the ONE place): distilled tokens of the whole window on all ranks.
        # DDP averages gradients over ranks, so each rank scales by world / n_window.
        n_window = all_reduce_sum(torch.tensor(float(sum(b.n_rows for b in batches)), device=dev), s.world)
        scale = s.world / n_window

        # ---- forward/backward, accumulating; gradients synchronise on the last micro-batch only
        stats = torch.zeros(len(STATS), dtype=torch.float64, device=dev)
        for j, b in enumerate(batches):
            b = b.to(dev)
            sync = j == len(batches) - 1 or s.world == 1
            with contextlib.nullcontext() if sync else s.body.no_sync():
                with autocast:
                    hidden = s.body(b.input_ids, b.position_ids, b.attention_mask)  # (B, L, H)
                sums = distill_loss_sums(hidden, s.weight, b, tc)
                loss = (tc.kd_weight * sums.kd + tc.ce_weight * sums.ce) * scale
                loss.backward()
            stats += _batch_stats(s, sums, b, micro[j])

        # ---- clip, step
        max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        lr = s.scheduler.get_last_lr()[0]
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)

        # ---- log
        stats = dict(zip(STATS, all_reduce_sum(stats, s.world).tolist(), strict=True))
        record = _record(s, step, stats, float(n_window), float(grad_norm), lr, time.perf_counter() - t0)
        if s.is_main and (step % tc.log_every == 0 or step == s.total_steps - 1):
            append_jsonl(layout.metrics(sub), [record])
            if tracker is not None:  # train.report_to: the same figures (ssb.core.tracking)
                tracker.log(record, step)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['distilled_tokens_per_s']:.0f}")
        bar.update(1)

        # ---- checkpoint
        if tc.save_every > 0 and (step + 1) % tc.save_every == 0:
            _checkpoint(s, layout.checkpoints(sub), step + 1)
        if stop_after is not None and step + 1 >= stop_after:
            stopped = True
            break
    bar.close()
    if tracker is not None:
        tracker.close()

    # ---- final adapter (standard PEFT format) + the run's facts
    return _finish(s, layout.adapter(sub), stopped)


def _finish(s: Setup, adapter_dir: Path, stopped: bool) -> Path:
    """Unless ``stopped`` early: the adapter (FSDP: every rank gathers the LoRA state) and ``train_facts.json``."""
    if not stopped:
        save_adapter(s.peft_model, adapter_dir, rank=s.rank)
    if s.is_main and not stopped:
        atomic_write_json(s.out_dir / "train_facts.json", s.facts)
    if s.world > 1:
        dist.barrier()
    return adapter_dir


def _open_outputs(s: Setup, run_dir: str | Path):
    """On the main rank: the output directory, its resolved config, the run's header line and the tracker
    (``train.report_to``); None elsewhere."""
    if not s.is_main:
        return None
    s.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(s.cfg, s.out_dir)
    print(
        f"ssb train: {len(s.examples)} examples, {s.total_steps} steps, global batch {s.global_batch} "
        f"({s.world} rank(s))\n{facts_table(s.facts)}",
        file=sys.stderr,
    )
    return open_tracker(s.cfg.train.report_to, s.out_dir, run_name=str(run_dir), config=config_to_dict(s.cfg))


# One micro-batch's sums, in this order (summed over the window and the ranks): kd, ce, teacher top-k mass at T,
# reply tokens, examples, input tokens, teacher top-k mass at T = 1
STATS = ("kd", "ce", "mass_t", "reply_tokens", "examples", "input_tokens", "mass_1")


def _batch_stats(s: Setup, sums, b, rows: list[int]) -> torch.Tensor:
    """(len(STATS),) float64 on the device: one micro-batch ``b`` (of examples ``rows``)'s contribution."""
    mass_t, mass_1 = s.teacher_mass.sums(b, rows, s.weight, s.cfg.train.kd_temperature)
    f64 = dict(dtype=torch.float64, device=s.device)
    return torch.stack(
        [
            sums.kd.detach().double(),
            sums.ce.detach().double(),
            torch.as_tensor(mass_t, **f64),
            b.reply_lens.sum().double().to(s.device),
            torch.tensor(float(len(b.reply_lens)), **f64),
            torch.tensor(float(b.n_input_tokens), **f64),
            torch.as_tensor(mass_1, **f64),
        ]
    )


def _record(s: Setup, step: int, stats: dict, n: float, grad_norm: float, lr: float, step_time: float) -> dict:
    """One ``metrics.jsonl`` line: ``stats`` are the window's sums over all ranks, ``n`` its distilled tokens."""
    tc = s.cfg.train
    return {
        "step": step,
        "epoch": (step + 1) * s.global_batch / len(s.examples),
        "loss": (tc.kd_weight * stats["kd"] + tc.ce_weight * stats["ce"]) / n,
        "kd_loss": stats["kd"] / n,
        "ce_loss": stats["ce"] / n,
        "grad_norm": grad_norm,
        "lr": lr,
        "distilled_tokens": int(n),
        "input_tokens": int(stats["input_tokens"]),
        "distilled_tokens_per_s": n / step_time,
        "step_time_s": step_time,
        "peak_memory_mb": peak_memory_mb(s.device),
        "completion_length": stats["reply_tokens"] / stats["examples"],
        s.teacher_mass.key: stats["mass_t"] / n,  # at the training T (TeacherMass says how it is formed)
        "teacher_topk_mass_t1": stats["mass_1"] / n,
    }


def _checkpoint(s: Setup, checkpoints: Path, steps_done: int) -> None:
    """Every rank saves its part of the state after ``steps_done`` optimizer steps (ssb.train.ckpt)."""
    save_checkpoint(
        checkpoints,
        steps_done,
        s.peft_model,
        s.optimizer,
        s.scheduler,
        rank=s.rank,
        world=s.world,
        barrier=dist.barrier if s.world > 1 else (lambda: None),
        extra={"total_steps": s.total_steps, "global_batch": s.global_batch},
    )


def run(cfg: SSBConfig, *, resume: bool = False, dry_run: bool = False) -> int:
    """``ssb train [--resume] [--dry-run]``."""
    run_dir = Path(cfg.run_dir)
    if dry_run:
        from ssb.train.dryrun import dry_run as probe

        return probe(cfg, run_dir)
    adapter = train(cfg, run_dir, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"ssb train: adapter written to {adapter}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
