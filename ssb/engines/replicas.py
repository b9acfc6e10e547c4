"""Where a process stands among vLLM's data-parallel replicas under torchrun, and the messages between them
(:mod:`ssb.engines.dp` says how a stage uses them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ssb.config import ConfigError, EngineConfig


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

    def share(self, n: int, replica: int | None = None) -> list[int]:
        """The conversations of a batch of ``n`` that ``replica`` (default: this process's) generates."""
        return list(range(self.replica if replica is None else replica, n, self.replicas))


def start() -> None:
    """The process group the ranks talk over (vLLM adopts it as its world group). The others wait in it while
    rank 0 does a stage's own work between batches, so its timeout is long."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=6))


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
        for i, item in zip(dp.share(n, replica), gathered[replica * dp.tp], strict=True):
            out[i] = item
    return out
