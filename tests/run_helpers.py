"""Helpers shared by the tests that run ``ssb`` end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ssb.run.plan import STAGES, expand


def run_two_rounds(out, config, overrides: list[str]) -> dict:
    """``ssb run --config CONFIG run_dir=OUT OVERRIDES`` (rounds=2 among them) in a subprocess, one thread;
    asserts it succeeded with every stage of two rounds done and returns ``run.json``'s stages."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ssb", "run", "--config", str(config), f"run_dir={out}", *overrides]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert {k: v["status"] for k, v in stages.items()} == {s.name: "done" for s in expand(STAGES, 2)}
    return stages
