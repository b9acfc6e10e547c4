"""``ssb demo --compare-sources`` on a reduced toy run: every arm trains on what it says, at SSB's token count, and
an arm killed mid-way resumes from its own ``run.json`` (the demo and the finished stages are not redone)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REDUCED = ["data.limit=24", "curate.target_pairs=8", "train.epochs=2", "eval.limit=16", "eval.n=1",
           "eval.bootstrap=100"]  # fmt: skip


def _status(run_dir: Path) -> dict:
    try:
        return {k: v["status"] for k, v in json.loads((run_dir / "run.json").read_text())["stages"].items()}
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def _kill_in_an_arm(cmd: list[str], env: dict, arm: Path) -> str:
    """Start ``cmd``, SIGKILL it once ``arm`` has finished a stage and runs the next; return the stage killed."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 900
    try:
        while proc.poll() is None and time.time() < deadline:
            status = _status(arm)
            running = [k for k, v in status.items() if v == "running"]
            if running and "done" in status.values():
                proc.send_signal(signal.SIGKILL)
                return running[0]
            time.sleep(0.05)
        raise AssertionError(f"the arm was never caught mid-way: {proc.stderr.read().decode()[-2000:]}")
    finally:
        proc.wait(timeout=60)


@pytest.mark.vllm
@pytest.mark.slow
def test_compare_sources_reduced(tmp_path):
    out = tmp_path / "cmp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ssb", "demo", "--compare-sources", "--seeds", "0", "--out", str(out), *REDUCED]
    arm = out / "seed0" / "op_rkl"
    killed = _kill_in_an_arm(cmd, env, arm)
    done_before = [k for k, v in _status(arm).items() if v == "done"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    skipped = [line for line in res.stderr.splitlines() if "done, inputs unchanged, skipped" in line]
    assert len(skipped) >= len(_status(out / "seed0")) + len(done_before), (killed, done_before, skipped)
    assert f"[ssb run] {killed}: running" in res.stderr  # the killed stage is redone
    assert set(_status(arm).values()) == {"done"}
    (seed,) = json.loads((out / "compare.json").read_text())
    ssb_tokens = seed["ssb_trained_tokens"]
    assert ssb_tokens > 0 and seed["pairs"] > 0
    for name, arm in seed["arms"].items():
        assert arm["sequences"] > 0 and arm["sample_counts"]["scored"] == arm["sequences"], name
        per_step = arm["trained_tokens"] / arm["steps"]
        assert abs(arm["trained_tokens"] - ssb_tokens) <= per_step * 1.5, (name, arm["trained_tokens"], ssb_tokens)
        results = json.loads(open(arm["results"]).read())
        assert 0.0 <= results["benchmarks"]["toy"]["aggregates"]["pass@k"]["1"]["value"] <= 1.0
    manifest = json.loads((out / "seed0" / "ssb_op" / "capture" / "manifest.json").read_text())
    assert manifest["distilled"]["source"] == "on_policy"
    train_cfg = (out / "seed0" / "op_rkl" / "train" / "config.yaml").read_text()
    assert "divergence: reverse_kl" in train_cfg
    table = (out / "compare.md").read_text().splitlines()
    assert [row.split("|")[2].strip() for row in table[2:]] == ["base", "ssb", "sft", "op_fkl", "op_rkl", "ssb_op"]
