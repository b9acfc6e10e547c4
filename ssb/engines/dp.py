"""vLLM's own data parallel for the generation stages (rollout, curate, eval) under torchrun.

``torchrun --nproc_per_node D*T -m ssb rollout --config C engine.data_parallel_size=D
engine.tensor_parallel_size=T`` starts D*T processes. Each builds the same ``vllm.LLM`` with vLLM's
``external_launcher`` executor, which makes D replicas of T GPUs each (vLLM derives a process's replica from
``RANK``). Rank 0 runs the stage; the other ranks only follow: they build the engine rank 0 asks for, generate
their share of every batch rank 0 sends (conversation ``i`` goes to replica ``i % D``) and send the replies
back. So the stage's files, resume and progress are exactly the single-process ones, and rank 0 alone writes.
Seeds are per sample (:func:`ssb.engines.types.sample_seeds`), so a reply does not depend on its replica.

Messages travel over a gloo process group that this module starts before vLLM does (vLLM then uses it as its
world group). vLLM tears that group down with the engine, so a process holds one data-parallel engine: run
each generation stage as its own torchrun command (``ssb run`` refuses data parallel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ssb.config import ConfigError, EngineConfig

GENERATION_STAGES = ("rollout", "curate", "eval")


@dataclass(frozen=True)
class DataParallel:
    """This process's place: ``replicas`` x ``tp`` ranks, world rank ``rank``."""

    replicas: int
    tp: int
    rank: int

    @classmethod
    def from_config(cls, engine_cfg: EngineConfig) -> DataParallel | None:
        """None for one replica; else this process's place, checked against torchrun's ``WORLD_SIZE``."""
        d, t = engine_cfg.data_parallel_size, engine_cfg.tensor_parallel_size
        if d == 1:
            return None
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != d * t:
            raise ConfigError(
                f"engine.data_parallel_size={d} x engine.tensor_parallel_size={t} needs {d * t} processes: run the "
                f"stage as `torchrun --nproc_per_node {d * t} -m ssb <rollout|curate|eval> ...` (WORLD_SIZE={world})"
            )
        if engine_cfg.backend != "vllm":
            raise ConfigError(f"engine.data_parallel_size={d}: vLLM's data parallel needs engine.backend=vllm")
        return cls(d, t, int(os.environ.get("RANK", "0")))

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def replica(self) -> int:
        return self.rank // self.tp

    def engine_kwargs(self) -> dict:
        """``vllm.LLM`` settings: vLLM's torchrun executor with D replicas of T."""
        return {
            "distributed_executor_backend": "external_launcher",
            "data_parallel_size": self.replicas,
            "tensor_parallel_size": self.tp,
        }

    def share(self, n: int) -> list[int]:
        """The conversations of a batch of ``n`` this replica generates."""
        return list(range(self.replica, n, self.replicas))


def start() -> None:
    """The process group the ranks talk over (vLLM adopts it as its world group). The others wait in it while
    rank 0 does a stage's own work between batches, so its timeout is long."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=6))


def run_stage(stage, engine_cfg: EngineConfig, run) -> int:
    """Run ``stage`` (called as ``run()``) here: alone without data parallel; under it, the stage on rank 0 and
    :func:`follow` on the others, rank 0 telling them to stop however its stage ends."""
    dp = DataParallel.from_config(engine_cfg) if stage in GENERATION_STAGES else None
    if dp is None:
        return run()
    if not dp.leader:
        return follow(engine_cfg)
    start()
    try:
        return run()
    finally:
        stop()


_stopped = False  # rank 0 has told the others to stop: their engines, and the process group, are gone


def stop() -> None:
    """Rank 0: tell the other ranks to stop (once: the engine's close and the stage's end both call it)."""
    global _stopped
    if not _stopped:
        send(("stop",))
        _stopped = True


def send(message: tuple) -> tuple:
    """Rank 0 sends ``message`` to every rank; every rank returns it."""
    import torch.distributed as dist

    if _stopped and message:
        raise ConfigError(
            "engine.data_parallel_size: one data-parallel engine per process; run each generation "
            "stage as its own torchrun command"
        )
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collect(dp: DataParallel, n: int, mine: list) -> list:
    """Every replica's ``mine`` (its :meth:`DataParallel.share` of ``n``) put back in order on rank 0 (None
    elsewhere). A replica's T ranks generate the same replies; its first rank's are used."""
    import torch.distributed as dist

    gathered = [None] * (dp.replicas * dp.tp) if dp.leader else None
    dist.gather_object(mine, gathered, dst=0)
    return merge(dp, n, gathered) if dp.leader else None


def merge(dp: DataParallel, n: int, gathered: list[list]) -> list:
    """Rank ``r``'s share in ``gathered[r]``: the ``n`` items in order, each from its replica's first rank."""
    out: list = [None] * n
    for replica in range(dp.replicas):
        for i, item in zip(range(replica, n, dp.replicas), gathered[replica * dp.tp], strict=True):
            out[i] = item
    return out


def follow(engine_cfg: EngineConfig) -> int:
    """A rank other than 0: build the engine rank 0 builds, generate what it sends, until it says stop."""
    from ssb.engines.vllm import VLLMEngine

    start()
    engine = None
    while True:
        kind, *body = send(())
        if kind == "build":
            engine = VLLMEngine(*body[0], **body[1])
        elif kind == "generate":
            engine.generate(*body[0], **body[1])
        else:  # "stop": rank 0's stage ended (closed, finished or failed)
            if engine is not None:
                engine.close()
            return 0
