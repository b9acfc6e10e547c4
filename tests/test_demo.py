"""A reduced ``ssb demo`` end to end on the embedded toy model: every artifact, the manifest, and a real kill.

The first run is killed with SIGKILL while a stage after rollout is running; the rerun skips what finished,
resumes the rest and produces the full report.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REDUCED = [
    "data.limit=24",
    "curate.target_pairs=8",
    "curate.attempts=4",
    "train.max_steps=3",
    "train.batch_size=4",
    "eval.limit=12",
    "eval.n=2",
    "eval.bootstrap=200",
]
REPORT_KEYS = {
    "base_pass1",
    "ssb_pass1",
    "sft_pass1",
    "rft_pass1",
    "premise",
    "hinted_pass1",
    "pairs",
    "store_bytes_per_row",
    "dense_bytes_per_row",
    "stage_seconds",
}
ALL_STAGES = ["rollout", "curate", "capture", "train", "train_sft", "train_rft", "eval"]


def _demo_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "ssb", "demo", "--out", str(out), *REDUCED]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _stage_status(out: Path) -> dict:
    try:
        return {k: v["status"] for k, v in json.loads((out / "run.json").read_text())["stages"].items()}
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def test_reduced_demo_survives_a_kill_and_reports(tmp_path):
    out = tmp_path / "demo"
    # first run: kill -9 as soon as a stage after rollout has started
    proc = subprocess.Popen(_demo_cmd(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_in = None
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        status = _stage_status(out)
        running = [s for s, st in status.items() if st == "running" and s != "rollout"]
        if running:
            proc.send_signal(signal.SIGKILL)
            killed_in = running[0]
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_in is not None, f"demo ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert _stage_status(out)["rollout"] == "done"

    # second run: completes, and does not redo the rollout
    res = subprocess.run(_demo_cmd(out), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rollout: done, inputs unchanged, skipped" in res.stderr
    assert _stage_status(out) == {s: "done" for s in ALL_STAGES}

    for rel in [
        "config.yaml",
        "rollout/rollouts.jsonl",
        "curate/teacher.jsonl",
        "curate/student.jsonl",
        "curate/curation_stats.json",
        "capture/manifest.json",
        "train/adapter/adapter_config.json",
        "train/metrics.jsonl",
        "train_sft/adapter/adapter_config.json",
        "train_rft/adapter/adapter_config.json",
        "train_rft/pairs.jsonl",
        "eval/base/results.json",
        "eval/ssb/results.json",
        "eval/sft/results.json",
        "eval/rft/results.json",
        "report.md",
        "report.png",
    ]:
        assert (out / rel).exists(), rel
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["pairs"] >= 1
    teacher = (out / "curate" / "teacher.jsonl").read_text().splitlines()
    assert len(teacher) == report["pairs"]
    for key in ("base_pass1", "ssb_pass1", "sft_pass1", "rft_pass1"):
        assert 0.0 <= report[key] <= 1.0
    assert report["store_bytes_per_row"] < report["dense_bytes_per_row_qwen"]
    assert set(report["stage_seconds"]) == set(ALL_STAGES)
    round1 = {"round": 1, "ssb_pass1": report["ssb_pass1"], "pairs": report["pairs"]}
    assert report["rounds"] == [{**round1, "tried": report["curation"]["candidates"]}]
    # the SFT control really trained on CE only, the SSB student on KD only
    ssb_metrics = [json.loads(x) for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    sft_metrics = [json.loads(x) for x in (out / "train_sft" / "metrics.jsonl").read_text().splitlines()]
    assert ssb_metrics[-1]["loss"] == pytest.approx(ssb_metrics[-1]["kd_loss"])
    assert sft_metrics[-1]["loss"] == pytest.approx(sft_metrics[-1]["ce_loss"])
    # the RFT baseline: CE on the model's own correct rollouts, for the SFT control's tokens (within one step)
    rft_metrics = [json.loads(x) for x in (out / "train_rft" / "metrics.jsonl").read_text().splitlines()]
    assert rft_metrics[-1]["loss"] == pytest.approx(rft_metrics[-1]["ce_loss"])
    tokens = report["trained_tokens"]
    assert abs(tokens["rft"] - tokens["sft"]) <= max(m["distilled_tokens"] for m in rft_metrics)
    assert report["premise"]["verdict"] == "better"  # the toy's hinted teacher is the better policy
    md = (out / "report.md").read_text()
    assert "| RFT baseline" in md and "Teacher premise on" in md and "SSB vs RFT" in md
    assert (out / "report.png").stat().st_size > 5000
