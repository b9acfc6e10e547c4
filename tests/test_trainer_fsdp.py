"""``train.parallel=fsdp``: ``torchrun --nproc_per_node 2`` with FSDP2 over gloo on CPU trains the same update as one
process on the same global batch, a run stopped after a checkpoint resumes onto the same curve, and QLoRA is refused.

The run directory (tiny Qwen2 student with a tied head, toy pairs, a store from a second random model) is
``test_trainer_ddp``'s fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer_ddp import _config, _metrics, assert_same_curve, run_world  # noqa: F401 (run_world is a fixture)

from ssb.cli import main as ssb_main

# Stops the run cleanly right after step 2 (its checkpoint written), as a pre-emption would.
STOPPER = """import sys
import torch.distributed as dist
from ssb.config import load_config
from ssb.train.loop import train
cfg = load_config(sys.argv[1])
train(cfg, cfg.run_dir, stop_after=2)
dist.destroy_process_group()
"""


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def fsdp_run(run_world):  # noqa: F811
    """One uninterrupted FSDP run: 2 ranks x 2 accumulated micro-batches of 1 (global batch 4, 3 steps)."""
    run_dir, cfg = _config(run_world, "fsdp", batch_size=1, grad_accum=2, parallel="fsdp")
    _torchrun(["-m", "ssb", "train", "--config", str(cfg)])
    return run_dir


@pytest.mark.slow
def test_fsdp_two_ranks_match_single_process(run_world, fsdp_run):  # noqa: F811
    # one process: 2 micro-batches of 2; FSDP: per rank 2 micro-batches of 1 (no reduce-scatter on the first)
    single, cfg_single = _config(run_world, "fsdp_single", batch_size=2, grad_accum=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert ssb_main(["train", "--config", str(cfg_single)]) == 0
    finally:
        torch.set_num_threads(threads)
    facts = json.loads((fsdp_run / "train" / "train_facts.json").read_text())
    assert (facts["world_size"], facts["parallel"]) == (2, "fsdp")
    m1, m2 = _metrics(single), _metrics(fsdp_run)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [0, 1, 2]
    # Only the fp32 summation order differs (micro-batches of 1 vs 2, a reduce-scatter instead of one sum), so
    # the losses agree to ~1e-7 per op (measured: kd_loss 1.8e-8 relative, adapter 3e-6 absolute after 3 steps of
    # Adam at lr 1e-2); the bounds leave ~10x room, while a lost or doubled micro-batch moves them by > 1e-2.
    assert_same_curve(m1, m2, loss_rel=1e-6, grad_rel=1e-5)
    w1, w2 = _adapter(single), _adapter(fsdp_run)
    assert w1.keys() == w2.keys() and w1
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"fsdp vs single: worst adapter |diff| {worst:.3g}, kd_loss rel diffs "
          f"{[abs(a['kd_loss'] / b['kd_loss'] - 1) for a, b in zip(m1, m2)]}")  # fmt: skip
    for k in w1:  # Adam can map fp32 noise in a near-zero gradient element to a fraction of lr: atol, not 0
        torch.testing.assert_close(w1[k], w2[k], atol=3e-5, rtol=1e-5)


@pytest.mark.slow
def test_fsdp_stopped_after_checkpoint_resumes_onto_the_same_curve(run_world, fsdp_run):  # noqa: F811
    run_dir, cfg = _config(run_world, "fsdp_cut", batch_size=1, grad_accum=2, parallel="fsdp", save_every=1)
    stopper = run_dir / "stop_after_2.py"
    stopper.write_text(STOPPER)
    _torchrun([str(stopper), str(cfg)])
    ckpt = run_dir / "train" / "checkpoints" / "step-000002"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "train" / "adapter").exists()
    _torchrun(["-m", "ssb", "train", "--config", str(cfg), "--resume"])
    facts = json.loads((run_dir / "train" / "train_facts.json").read_text())
    assert facts["resumed_from"].endswith("step-000002")
    whole, resumed = _metrics(fsdp_run), _metrics(run_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2]
    # same ranks, same order of operations: equal to rounding
    assert_same_curve(whole, resumed, loss_rel=1e-6, grad_rel=1e-6)
    w1, w2 = _adapter(fsdp_run), _adapter(run_dir)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-6)


def test_qlora_with_fsdp_is_refused():
    from ssb.core.config_rules import ConfigError

    with pytest.raises(ConfigError, match=r"train\.qlora.*train\.parallel=fsdp") as err:
        from ssb.config import load_config

        load_config(None, ["train.qlora=true", "train.parallel=fsdp"])
    assert "train.parallel" in err.value.keys
    with pytest.raises(ConfigError, match="train.parallel: expected one of ddp|fsdp"):
        load_config(None, ["train.parallel=zero3"])
