"""More than one rank: DDP (``train.parallel=ddp``, every rank holds the whole model) or FSDP2
(``train.parallel=fsdp``, ``torch.distributed.fsdp.fully_shard``).

Under FSDP2 each decoder layer is its own shard group: the frozen base weights, the LoRA parameters, their
gradients and (since the optimizer is built over the sharded parameters) the AdamW states are split over the
ranks. The input embedding and the LM head stay replicated (``ignored_params``): the fused loss needs the head as
a full ``(V, H)`` tensor for the whole forward/backward either way (FSDP2 keeps the root unsharded from forward to
backward), so sharding it saves memory only between steps and adds an all-gather of V*H per step. Measured
(LOG.md 2026-12-04; tiny Qwen2, H=32, 2 layers, LoRA r=8, 2 gloo ranks on 2 CPU cores, 2x256 tokens per rank,
median step of 20, two runs each): V=320 replicated 0.052/0.055 s, gathered 0.047/0.050 s; V=32000 replicated
0.100/0.111 s, gathered 0.117/0.112 s; peak RSS equal within 5 MB (500 MB at V=320, 727 MB at V=32000, the
runtime dominates). The head's share grows with V, where replicated is as fast or faster, and the loop needs no
per-micro-batch weight lookup: replicated. ``wrap_body(shard_head=True)`` is the gathered variant.

Checkpoints go through ``torch.distributed.checkpoint`` (every rank writes its shards; ``dcp/``) with the
state dicts of ``get_state_dict``; the adapter is gathered whole and written by rank 0 in PEFT format.
QLoRA is refused with FSDP (``ssb.core.config_rules``): bitsandbytes' 4-bit ``Params4bit`` carries its
quantisation state outside the tensor, which FSDP2 cannot shard on CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ssb.train.model import StudentBody

LORA_STATE = {"full_state_dict": True, "cpu_offload": True, "ignore_frozen_params": True}


class ShardedBody(StudentBody):
    """:class:`StudentBody` whose decoder layers (and itself) are FSDP2-sharded; ``no_sync`` like DDP's."""

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate unreduced gradients (no reduce-scatter) until the context exits."""
        self.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.set_requires_gradient_sync(True)


def wrap_body(peft_model: nn.Module, parallel: str, world: int, device: torch.device, *, shard_head: bool = False):
    """The module the loop runs: the bare body (one rank), DDP over it, or the FSDP2-sharded body.

    ``shard_head`` (measurement only) shards the embedding/head too; the loop then needs the gathered weight.
    """
    if world == 1:
        return StudentBody(peft_model)
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(
            StudentBody(peft_model), device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.fsdp import fully_shard

    body = ShardedBody(peft_model)
    base = peft_model.get_base_model()
    for layer in base.get_decoder().layers:
        fully_shard(layer)
    head = {base.get_output_embeddings().weight, base.get_input_embeddings().weight}
    fully_shard(body, ignored_params=None if shard_head else head)
    return body


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor (the model was wrapped by :func:`wrap_body` for FSDP)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def save_adapter(peft_model: nn.Module, out: Path, *, rank: int) -> None:
    """Rank 0 writes a standard PEFT adapter; under FSDP every rank must call this (the LoRA state is gathered)."""
    if not is_sharded(peft_model):
        if rank == 0:
            peft_model.save_pretrained(out)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(peft_model, options=StateDictOptions(**LORA_STATE))  # full on rank 0 only
    if rank == 0:
        peft_model.save_pretrained(out, state_dict=state)


def _state_dicts(peft_model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(peft_model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_sd, "optim": optim_sd}


def save_sharded(ckpt_dir: Path, peft_model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the LoRA parameters and optimizer states to ``ckpt_dir/dcp``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(peft_model, optimizer), checkpoint_id=str(ckpt_dir / "dcp"))


def load_sharded(ckpt_dir: Path, peft_model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what :func:`save_sharded` wrote, resharded onto this run's ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state_dicts(peft_model, optimizer)
    dcp.load(state, checkpoint_id=str(ckpt_dir / "dcp"))
    set_state_dict(
        peft_model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    # strict=False: the frozen base is not in the checkpoint; dcp.load above already failed on any missing LoRA key
