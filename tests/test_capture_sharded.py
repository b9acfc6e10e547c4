"""Sharded capture: ``torchrun --nproc_per_node 2 -m ssb capture`` (gloo on CPU) writes the single-process store.

Seven curated examples, two per shard: four shards, ranks 0 and 1 capture shards {0, 2} and {1, 3}. The store is
compared with a single-process capture of the same inputs through the reader (every example's tensors, bit for
bit) and by the manifest (counts, and each shard's rows, bytes and sha256). Then a run that lost its manifest
and one of rank 1's shards (as a kill mid-way leaves it) is rerun: rank 1 captures that shard alone, every
other shard stays untouched, and the store is again the single-process one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_capture import make_cfg, tiny_model_dir, write_curated  # noqa: F401 - tiny_model_dir is a fixture

from ssb.capture import capture
from ssb.capture.ranks import Ranks
from ssb.config import ConfigError
from ssb.store import TeacherStore
from ssb.store.format import MANIFEST, shard_name

SHARD_EXAMPLES = 2  # 7 examples -> 4 shards


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """The reference: one process, one thread (as each torchrun rank below), the same inputs."""
    run_dir = tmp_path_factory.mktemp("single")
    t, s = write_curated(run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = make_cfg(tiny_model_dir, run_dir, shard_examples=SHARD_EXAMPLES)
        capture(cfg, t, s, run_dir / "capture", ranks=Ranks())
    finally:
        torch.set_num_threads(threads)
    return run_dir / "capture"


def _torchrun_capture(run_dir: Path, model_dir: Path) -> subprocess.CompletedProcess:
    cap = {"k": 8, "temperatures": [1.0, 2.0], "token_budget": 700, "shard_examples": SHARD_EXAMPLES}
    cfg = {"run_dir": str(run_dir), "model": {"name_or_path": str(model_dir), "dtype": "float32"}, "capture": cap}
    (run_dir / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "ssb", "capture", "--config", str(run_dir / "config.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _assert_same_store(got: Path, want: Path) -> None:
    a, b = TeacherStore(got), TeacherStore(want)  # verify=True: every shard's sha256 against its manifest
    ma, mb = a.manifest, b.manifest
    assert ma["counts"] == mb["counts"] and ma["fingerprint"] == mb["fingerprint"]
    assert ma["shards"] == mb["shards"]  # same files, examples, rows, bytes and sha256
    drop = ("path", "inputs")  # the curated files' paths differ (their sha256 are in the fingerprint)
    assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}
    assert len(a) == len(b) == 7
    for i in range(len(b)):
        x, y = a[i], b[i]
        assert x.example_index == y.example_index
        for name in ("token_ids", "topk_ids", "topk_logprobs", "token_logprob"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.dtype == ty.dtype and torch.equal(tx, ty), (i, name)
        assert x.lse.keys() == y.lse.keys() and all(torch.equal(x.lse[t], y.lse[t]) for t in y.lse)


@pytest.mark.slow
def test_two_ranks_write_the_single_process_store_and_resume_per_rank(tiny_model_dir, single, tmp_path):  # noqa: F811
    run_dir = tmp_path / "sharded"
    write_curated(run_dir)
    proc = _torchrun_capture(run_dir, tiny_model_dir)
    store = run_dir / "capture"
    _assert_same_store(store, single)
    assert "capture rank 0" in proc.stderr and "capture rank 1" in proc.stderr
    assert proc.stderr.count("[capture] ") == 1, proc.stderr  # rank 0 alone reports the store
    assert (store / "config.yaml").exists()

    # a run killed mid-way: no manifest yet, and rank 1 had written shard 1 but not shard 3
    (store / MANIFEST).unlink()
    (store / shard_name(3)).unlink()
    kept = {j: (store / shard_name(j)).stat().st_mtime_ns for j in (0, 1, 2)}
    proc = _torchrun_capture(run_dir, tiny_model_dir)
    assert "3/4 shards already complete, capturing 1" in proc.stderr, proc.stderr
    assert {j: (store / shard_name(j)).stat().st_mtime_ns for j in (0, 1, 2)} == kept
    _assert_same_store(store, single)
    assert not list(run_dir.glob("capture.stale-*"))

    # complete: a third run verifies and captures nothing
    proc = _torchrun_capture(run_dir, tiny_model_dir)
    assert "complete and up to date" in proc.stderr
    _assert_same_store(store, single)


def test_ranks_take_every_worldth_shard():
    shards = [0, 1, 3, 4, 6]
    parts = [Ranks(r, 3, r).mine(shards) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], []]
    assert Ranks().mine(shards) == shards


def test_vllm_capture_refuses_torchrun_in_one_line(tiny_model_dir, tmp_path):  # noqa: F811
    t, s = write_curated(tmp_path)
    cfg = make_cfg(tiny_model_dir, tmp_path, backend="vllm")
    with pytest.raises(ConfigError, match="only the hf backend captures sharded under torchrun"):
        capture(cfg, t, s, tmp_path / "capture", ranks=Ranks(1, 2, 1))
    assert not (tmp_path / "capture").exists()
