"""Fault injection on a finished toy run: nothing made is lost, resume checks the disk, interrupts are clean.

One reduced ``ssb run`` on the embedded toy model (HF engine, three capture shards) is made once per module; every
case works on a copy of its directory and runs ``ssb`` in a subprocess, as a user would. Each case asserts the one
line the command ends with, its exit status, and that no output made before it was lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from ssb.store import TeacherStore
from ssb.store.format import MANIFEST, shard_name

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"
REDUCED = ["engine.backend=hf", "data.limit=16", "curate.target_pairs=6", "curate.attempts=4",
           "capture.shard_examples=2", "train.max_steps=2", "train.batch_size=4", "eval.limit=8", "eval.n=1",
           "eval.bootstrap=100"]  # fmt: skip
RESUME_LINE = "interrupted in {stage}; rerun the same command to resume"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _cmd(command: str, run_dir: Path, *extra: str) -> list[str]:
    head = [sys.executable, "-m", "ssb", command]
    return [*head, "--config", str(CONFIG), f"run_dir={run_dir}", *REDUCED, *extra]


def ssb(command: str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(command, run_dir, *extra), env=_env(), capture_output=True, text=True, timeout=300)


def last_line(res: subprocess.CompletedProcess | str) -> str:
    err = res if isinstance(res, str) else res.stderr
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def files(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` by relative path, with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    res = ssb("run", out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(TeacherStore(out / "capture").manifest["shards"]) == 3
    return out


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A private copy of the finished run (mtimes kept)."""
    return Path(shutil.copytree(finished, tmp_path / "run", symlinks=True))


# --------------------------------------------------------------------------------------------------
# Never delete what you did not make


def test_a_bad_capture_value_keeps_the_finished_store(run_dir):
    before = files(run_dir / "capture")
    for command in ("capture", "run"):
        res = ssb(command, run_dir, "capture.k=0")
        assert res.returncode == 2, res.stderr[-3000:]
        line = last_line(res)
        assert line.startswith(f"ssb {command}: ") and "capture.k" in line, line
        assert files(run_dir / "capture") == before  # byte-identical, nothing moved aside
        assert not list(run_dir.glob("capture.stale-*"))


def test_other_capture_settings_move_the_old_store_aside(run_dir):
    before = files(run_dir / "capture")
    res = ssb("capture", run_dir, "capture.k=16")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "made from other inputs/settings, moved to" in res.stderr
    (aside,) = run_dir.glob("capture.stale-*")
    assert files(aside) == before  # the old store, whole
    assert TeacherStore(run_dir / "capture").k == 16


@pytest.mark.parametrize(
    ("command", "stage_dir", "extra"),
    [("rollout", "rollout", ["rollout.temperature=0.7"]), ("curate", "curate", ["curate.temperature=0.6"]),
     ("train", "train", ["--resume", "train.lr=1e-3"])],
    ids=["rollout", "curate", "train"],
)  # fmt: skip
def test_other_stage_settings_move_the_finished_outputs_aside(run_dir, command, stage_dir, extra):
    """A finished stage rerun with another setting of its own keeps the old outputs, byte for byte, under
    ``<stage>.stale-<time>/`` and starts over (``--resume`` too: it resumes only work of the same settings)."""
    before = files(run_dir / stage_dir)
    res = ssb(command, run_dir, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    (aside,) = run_dir.glob(f"{stage_dir}.stale-*")
    assert f"{run_dir / stage_dir}: made from other settings or inputs, moved to {aside}" in res.stderr
    assert files(aside) == before  # the finished outputs, whole
    after = files(run_dir / stage_dir)
    assert after.keys() == before.keys() and after["state.json"] != before["state.json"]  # made again, anew
    (section, key), value = extra[-1].split("=")[0].split("."), float(extra[-1].split("=")[1])
    assert yaml.safe_load(after["config.yaml"])[section][key] == value  # under the new setting


# --------------------------------------------------------------------------------------------------
# Resume checks the disk


def test_run_redoes_a_deleted_train_output(run_dir, finished):
    shutil.rmtree(run_dir / "train")
    upstream = {d: files(run_dir / d) for d in ("rollout", "curate", "capture")}
    res = ssb("run", run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("rollout", "curate", "capture"):
        assert f"[ssb run] {stage}: done, inputs unchanged, skipped" in res.stderr
    assert f"train: done before, but {run_dir / 'train' / 'adapter' / 'adapter_config.json'} is missing" in res.stderr
    assert {d: files(run_dir / d) for d in upstream} == upstream
    adapter = "train/adapter/adapter_model.safetensors"
    assert (run_dir / adapter).read_bytes() == (finished / adapter).read_bytes()  # the same training, redone
    assert {k: v["status"] for k, v in stages(run_dir)["stages"].items()} == dict.fromkeys(
        ("rollout", "curate", "capture", "train", "eval"), "done"
    )


def test_run_repairs_a_corrupt_store_and_redoes_what_follows(run_dir, finished):
    shard = run_dir / "capture" / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = ssb("run", run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"capture: done before, but {shard}: sha256 does not match" in res.stderr
    assert f"{shard}: sha256 does not match manifest.json (corrupt shard); recapturing it" in res.stderr
    assert "[ssb run] train: running" in res.stderr and "[ssb run] eval: running" in res.stderr
    assert shard.read_bytes() == (finished / "capture" / shard_name(1)).read_bytes()


def _flip(f: Path) -> str:
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    return "sha256 does not match manifest.json (corrupt shard)"


def _truncate(f: Path) -> str:
    f.write_bytes(f.read_bytes()[:-64])
    return "truncated?"


def _delete(f: Path) -> str:
    f.unlink()
    return "shard listed in manifest.json is missing"


@pytest.mark.parametrize("fault", [_flip, _truncate, _delete], ids=["corrupt", "truncated", "deleted"])
def test_capture_repairs_exactly_the_bad_shard(run_dir, finished, fault):
    store, bad = run_dir / "capture", run_dir / "capture" / shard_name(1)
    before = files(store)
    n = len(json.loads(before[MANIFEST])["shards"])
    why = fault(bad)
    res = ssb("capture", run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{bad}: " in res.stderr and why in res.stderr and "recapturing it" in res.stderr
    assert f"{n - 1}/{n} shards already complete, capturing 1" in res.stderr
    assert "[capture] " in last_line(res)
    TeacherStore(store, verify=True)  # every shard present, whole, matching the manifest
    after = files(store)
    shards = [shard_name(j) for j in range(n)]
    assert {n: after[n] for n in shards} == {n: before[n] for n in shards}  # deterministic: the original bytes
    assert json.loads(after[MANIFEST])["shards"] == json.loads(before[MANIFEST])["shards"]
    assert not list(run_dir.glob("capture.stale-*"))


def test_an_empty_dataset_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = ssb("rollout", tmp_path / "run", f"data.source={empty}")
    assert res.returncode == 2, res.stderr[-3000:]
    line = last_line(res)
    assert line.startswith("ssb rollout: ") and "no problems" in line and str(empty) in line, line
    assert not (tmp_path / "run" / "rollout" / "rollouts.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# Interrupts


def _wait_for(pred, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert proc is None or proc.poll() is None, f"ended first: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _eval_status(run_dir: Path) -> str | None:
    try:
        return stages(run_dir)["stages"]["eval"]["status"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_stage_says_so_in_one_line_and_resumes(run_dir, sig):
    shutil.rmtree(run_dir / "eval")  # ssb run redoes the eval stage ...
    proc = subprocess.Popen(_cmd("run", run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    _wait_for(lambda: (run_dir / "eval" / "base" / "partial").is_dir(), proc=proc)  # ... and is inside it
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    assert last_line(err) == "ssb run: " + RESUME_LINE.format(stage="eval")
    manifest = stages(run_dir)
    assert manifest["stages"]["eval"]["status"] == "interrupted"
    assert manifest["interrupted"]["stage"] == "eval" and manifest["interrupted"]["signal"] == sig.name
    assert manifest["stages"]["train"]["status"] == "done"
    res = ssb("run", run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[ssb run] eval: running (interrupted last time: resuming)" in res.stderr
    assert "[ssb run] train: done, inputs unchanged, skipped" in res.stderr
    assert _eval_status(run_dir) == "done" and "interrupted" not in stages(run_dir)
    assert (run_dir / "eval" / "ssb" / "results.json").exists()


def _graders(proc: psutil.Process) -> list[psutil.Process]:
    return [p for p in proc.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def test_killed_eval_leaves_no_orphans_and_resumes(run_dir):
    shutil.rmtree(run_dir / "eval")
    limit = 24  # a longer eval, in small batches graded as it goes
    extra = [f"eval.limit={limit}", "engine.batch_size=2", "eval.grader_workers=2"]
    proc = subprocess.Popen(_cmd("eval", run_dir, *extra), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    parent = psutil.Process(proc.pid)
    partial = run_dir / "eval" / "base" / "partial" / "toy.jsonl"
    _wait_for(lambda: _graders(parent) and partial.is_file() and partial.stat().st_size > 0, proc=proc)
    children = parent.children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in children)
    assert "resource_tracker" in names and "spawn_main" in names, names  # what used to be left orphaned
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
    kept = partial.read_text().splitlines(keepends=True)
    kept = kept if not kept or kept[-1].endswith("\n") else kept[:-1]  # a line cut by the kill is redone
    res = ssb("eval", run_dir, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    assert partial.read_text().startswith("".join(kept))  # what was graded before the kill is kept
    results = json.loads((run_dir / "eval" / "base" / "results.json").read_text())
    assert len(results["benchmarks"]["toy"]["problems"]) == limit
    assert (run_dir / "eval" / "ssb" / "results.json").exists()
