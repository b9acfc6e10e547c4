"""bench/gpu.sh's CPU dry run (SSB_GPU_SMALL=1 TRITON_INTERPRET=1): the pipeline's mechanics, not the kernels.

Every stage leaves a record (done, or skipped / killed with its reason), every line of the .jsonl parses, the
correctness verdict is present and well-formed (pass or fail: the kernels are tested elsewhere), the summary and
the report-readable suite file exist; a tiny budget skips the later stages by name and keeps what came before,
and a stage that hangs is killed at the deadline with its earlier records intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import check  # noqa: E402
from kd_gpu import NAMES, STAGES  # noqa: E402

pytestmark = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("torch", "triton")), reason="needs torch and triton"
)
FINAL = {"done", "skipped", "killed", "failed"}


def gpu_sh(out: Path, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run bench/gpu.sh's dry run into ``out``; return the process and the records of its one .jsonl."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SSB_GPU_")}
    full = {**base, "SSB_GPU_SMALL": "1", "TRITON_INTERPRET": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], env=full, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    files = sorted(out.glob("*.jsonl"))
    assert len(files) == 1, f"one .jsonl expected, got {files}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert files[0].name.startswith("cpu-interpreter-"), files[0].name
    recs = [json.loads(line) for line in files[0].read_text().splitlines()]  # every line parses
    assert recs and all({"run", "stage", "kind"} <= r.keys() for r in recs)
    assert len({r["run"] for r in recs}) == 1
    return proc, recs


def final_status(recs: list[dict], stage: str) -> dict:
    st = [r for r in recs if r["stage"] == stage and r["kind"] == "stage" and r.get("status") != "start"]
    assert len(st) == 1, f"{stage}: one final stage record expected, got {st}"
    assert st[0]["status"] in FINAL
    if st[0]["status"] != "done":
        assert st[0].get("reason"), f"{stage}: {st[0]['status']} without a reason"
    return st[0]


def _number(v) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) or v in ("inf", "-inf", "nan")


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path):
    proc, recs = gpu_sh(tmp_path, timeout=400)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: correctness failed (allowed)
    env = [r for r in recs if r["kind"] == "env"]
    assert len(env) == 1 and env[0]["slug"] == "cpu-interpreter" and env[0]["small"] is True
    stem = tmp_path / Path(next(tmp_path.glob("*.jsonl")).stem)
    assert stem.with_suffix(".log").read_text().strip()
    status = {s: final_status(recs, s)["status"] for s in NAMES}
    assert status["correctness"] == "done", proc.stdout[-3000:]
    verdict = [r for r in recs if r["kind"] == "verdict"]
    assert len(verdict) == 1 and isinstance(verdict[0]["ok"], bool) and isinstance(verdict[0]["failed"], list)
    cases = [r for r in recs if r["stage"] == "correctness" and r["kind"] in ("result", "error")]
    assert {c["name"] for c in cases} >= {f"{d}/{x}" for d in ("bfloat16", "float16")
                                          for x in ("forward_kl", "reverse_kl", "jsd", "kd_ce", "topk")}  # fmt: skip
    assert any("confident-lead60" in c["name"] for c in cases) and any("confident-lead20" in c["name"] for c in cases)
    for c in cases:
        if c["kind"] == "result":
            assert isinstance(c["ok"], bool)
            keys = ("ids_agree_ties_aside",) if c["name"].endswith("topk") else ("loss_rel_max", "dh_rel_worst")
            assert all(_number(c[k]) for k in keys), c
    timing = [s.name for s in STAGES if s.timing]
    for s in timing:
        if verdict[0]["ok"]:
            assert status[s] == "done", (s, proc.stdout[-3000:])
            assert any(r["stage"] == s and r["kind"] in ("result", "skip", "error") for r in recs), s
        else:  # no benchmark of wrong kernels
            assert status[s] == "skipped" and "correctness" in final_status(recs, s)["reason"]
    if verdict[0]["ok"]:
        kd = {r["name"]: r for r in recs if r["stage"] == "kd" and r["kind"] == "result"}
        assert {"n4/floor", "n4/triton", "n16/triton"} <= kd.keys()
        assert _number(kd["n4/triton"]["ms_min"]) and _number(kd["n4/triton"]["x_floor"])
        peers = {r["name"] for r in recs if r["stage"] == "peers" and r["kind"] != "stage"}
        assert {"liger-flce", "cce"} <= {p.split("/")[-1] for p in peers}  # run, or skipped with the reason
        suite = check.load_set(stem.with_suffix(".json"))  # bench/report.py and bench/check.py read it
        assert "kd_gpu/kd/n4/triton" in suite
    md = stem.with_suffix(".md").read_text()
    assert "| stage | status |" in md and all(f"| {s} |" in md for s in NAMES)
    assert any(r["stage"] == "summary" and r.get("status") == "done" for r in recs)


def test_tiny_budget_skips_later_stages_by_name(tmp_path):
    """SSB_GPU_BUDGET_S=5: the probe's record stays; every stage is skipped, named, for the budget."""
    proc, recs = gpu_sh(tmp_path, timeout=120, SSB_GPU_BUDGET_S="5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [r["slug"] for r in recs if r["kind"] == "env"] == ["cpu-interpreter"]
    for s in NAMES:
        st = final_status(recs, s)
        assert st["status"] == "skipped" and st["reason"].startswith("budget"), st
        assert f"{s}: SKIPPED (budget" in proc.stdout


@pytest.mark.slow
def test_overrun_is_killed_at_the_deadline(tmp_path):
    """A stage that hangs is killed at the deadline; what it wrote stays, later stages are skipped by name."""
    proc, recs = gpu_sh(tmp_path, timeout=180, SSB_GPU_BUDGET_S="25", SSB_GPU_STALL="correctness",
                        SSB_GPU_EST_SCALE="0")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    st = final_status(recs, "correctness")
    assert st["status"] == "killed", st
    assert any(r["stage"] == "correctness" and r.get("name") == "stall" for r in recs)  # written before the kill
    for s in NAMES[1:]:
        assert final_status(recs, s)["status"] == "skipped"
