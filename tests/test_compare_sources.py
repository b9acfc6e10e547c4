"""``ssb demo --compare-sources`` on a reduced toy run: every arm trains on what it says, at SSB's token count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REDUCED = ["data.limit=24", "curate.target_pairs=8", "train.epochs=2", "eval.limit=16", "eval.n=1",
           "eval.bootstrap=100"]  # fmt: skip


@pytest.mark.vllm
@pytest.mark.slow
def test_compare_sources_reduced(tmp_path):
    out = tmp_path / "cmp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ssb", "demo", "--compare-sources", "--seeds", "0", "--out", str(out), *REDUCED]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
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
