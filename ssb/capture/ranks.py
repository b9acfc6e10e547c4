"""Sharded capture under ``torchrun --nproc_per_node N -m ssb capture``: which shards this rank captures, and the
barriers between the ranks.

Shard ``j`` always covers examples ``[j * S, (j + 1) * S)`` (``S = capture.shard_examples``), whatever the number
of ranks, and goes to rank ``j % N``. So a store captured by N ranks is the single-process store byte for byte
(the same batches of the same examples run through the same model), and a rerun with any N resumes it: each
rank captures only its own shards that are still missing or bad. Ranks talk through the store directory; the
process group (gloo, also on GPUs: it carries nothing but barriers) exists only for the barriers around the
moves aside and the manifest.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

BARRIER_TIMEOUT = datetime.timedelta(hours=6)  # a rank done early waits at the last barrier for the others' shards


@dataclass(frozen=True)
class Ranks:
    """This process's place among the capture ranks (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, shards: list[int]) -> list[int]:
        """The shards of ``shards`` this rank captures: ``j % world == rank``."""
        return [j for j in shards if j % self.world == self.rank]

    def start(self) -> None:
        """Before the model loads: this rank's GPU (``LOCAL_RANK``) and, with several ranks, the process group."""
        import torch

        if self.world > 1 and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)  # "cuda" now means this rank's device (HFCapture's default)
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def stop(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
