"""What every generation engine shares: the sampling request, the completion, the engine protocol, per-sample seeds.

Sample ``j`` of conversation ``i`` is drawn with its own seed ``derive_seed(sampling.seed, key_i, j)``, so results
do not depend on how the work was split into calls, and a resumed stage reproduces the same samples. Both engines
stop at the tokenizer's end-of-turn token and report ``finish_reason`` "stop" or "length".
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ssb.config import SamplingConfig

FinishReason = Literal["stop", "length"]
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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

    @classmethod
    def from_config(cls, block: SamplingConfig, n: int) -> Sampling:
        """``n`` samples with the sampling block of a config section (``rollout``, ``curate``)."""
        return cls(
            n=n,
            temperature=block.temperature,
            top_k=block.top_k,
            top_p=block.top_p,
            max_new_tokens=block.max_new_tokens,
            seed=block.seed,
        )


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


class BatchProgress:
    """Progress inside one generation call, which on a CPU can run for many minutes: finished sequences out of the
    call's total, decode steps out of ``max_new_tokens``, and generated tokens/s, on a bar named after the stage.

    ``exact`` says whether ``active`` counts only sequences that really decoded this step (HF) or every unfinished
    request, waiting ones included (vLLM): then the rate is an upper bound and is shown with a "<=".
    """

    def __init__(self, desc: str, total: int, max_new_tokens: int, *, exact: bool, show: bool = True) -> None:
        from tqdm import tqdm

        self.max_new_tokens, self.exact = max_new_tokens, exact
        self.steps = self.tokens = 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(
            total=total,
            desc=f"{desc}: sequences",
            unit="seq",
            leave=False,
            file=sys.stderr,
            mininterval=2.0,
            dynamic_ncols=True,
            disable=not show,
        )

    def step(self, active: int, finished: int = 0) -> None:
        """One decode step in which ``active`` sequences were generating and ``finished`` completed."""
        self.steps += 1
        self.tokens += active
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        bound = "" if self.exact else "<="
        self.bar.set_postfix_str(f"step {self.steps}/{self.max_new_tokens}, {bound}{rate:.0f} tok/s", refresh=False)
        self.bar.update(finished)

    def finished(self, n: int) -> None:
        """``n`` sequences completed outside a decode step (they ran to ``max_new_tokens`` with the call)."""
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


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
        desc: str = "generate",  # names the progress bar (the stage)
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


def split_at_stop(ids: list[int], stop_ids: set[int]) -> tuple[list[int], FinishReason]:
    """Cut generated ids after the first stop token. Returns (ids incl. the stop token, finish reason)."""
    for pos, tid in enumerate(ids):
        if tid in stop_ids:
            return ids[: pos + 1], "stop"
    return ids, "length"
