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

from ssb.config import EngineConfig
from ssb.engines.replicas import DataParallel, send, start, stop
from ssb.engines.vllm import VLLMEngine

GENERATION_STAGES = ("rollout", "curate", "eval")


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


def follow(engine_cfg: EngineConfig) -> int:
    """A rank other than 0: build the engine rank 0 builds, generate what it sends, until it says stop."""
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
