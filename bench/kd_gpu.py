"""The driver of bench/gpu.sh: one prepared shot on a short GPU session, under one global deadline.

    bash bench/gpu.sh                                           # GPU: Qwen2.5-3B shapes, 480 s budget
    SSB_GPU_SMALL=1 TRITON_INTERPRET=1 OUT=DIR bash bench/gpu.sh  # CPU dry run: the same stages on tiny shapes

This module imports no torch: it runs each stage of ``STAGES`` (bench/gpu_stages.py) in its own process, in order
of value, and owns the clock. The budget (``SSB_GPU_BUDGET_S``, default 480 s; 180 s with ``SSB_GPU_SMALL=1``)
counts from ``SSB_GPU_T0`` (gpu.sh's start). A stage is skipped, and named, when the time left cannot cover its
minimum (``Stage.est_s``); one that overruns is killed at the deadline (its process group: SIGTERM, then
SIGKILL), and what it already wrote stays. A few seconds are kept for the summary.

Files, in ``$OUT`` (default bench/results/; with SSB_GPU_SMALL a temporary folder, so a dry run never lands in
the performance table), named ``<slug>-<commit>`` from the device (``nvidia-h200``, ``cpu-interpreter``):
  .jsonl  every record, appended and flushed the moment it exists (one JSON object per line; every record has
          ``run``, ``stage``, ``kind``: env / stage (status start, done, skipped, killed, failed) / result /
          skip / error / verdict)
  .log    everything the stages printed
  .md     the summary (stage table, correctness, timings, and the performance table rows), if time remains
  .json   the timings as a bench/measure.py suite file (suite "kd_gpu"), read by bench/report.py and check.py

Timing stages need a passing correctness verdict from the same run: no benchmark of wrong kernels
(``SSB_GPU_TIME_ANYWAY=1`` overrides; when ``SSB_GPU_STAGES`` leaves correctness out they run with a note).
Other knobs: ``SSB_GPU_STAGES=kd,topk`` (a subset), ``SSB_GPU_EST_SCALE`` (multiplies every stage's minimum;
tests), ``SSB_GPU_STALL=<stage>`` (that stage writes one record and hangs: tests of the deadline kill).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from hardware import git_commit  # noqa: E402  (stdlib only at import)

SUMMARY_RESERVE_S = 3.0  # kept back from every stage for the summary
SUITE = "kd_gpu"


@dataclass(frozen=True)
class Stage:
    name: str
    est_s: float  # the least time worth starting it with on a GPU (process start, inputs, one pass)
    est_small_s: float  # the same for the CPU dry run
    timing: bool  # a benchmark: needs a passing correctness verdict
    what: str


STAGES = (
    Stage("correctness", 60, 8, False, "bf16/fp16 loss and dh per row vs eager float64; top-k ids"),
    Stage("kd", 45, 4, True, "sparse_kd_loss fwd+bwd vs the 4NHV bare-GEMM floor, peak extra memory"),
    Stage("kd_ce", 30, 4, True, "sparse_kd_ce_loss (KD + CE, one pass) fwd+bwd vs the floor"),
    Stage("peers", 30, 2, True, "Liger fused linear CE, Cut Cross-Entropy, torch linear_cross_entropy"),
    Stage("topk", 25, 4, True, "topk_logprobs capture vs the one-GEMM floor"),
    Stage("pytest", 60, 6, False, "pytest -m gpu tests/test_kernels_triton.py (when pytest is installed)"),
)
NAMES = tuple(s.name for s in STAGES)


# ------------------------------------------------------------------------------------------------- records
def clean(v: Any) -> Any:
    """JSON-safe: non-finite floats become the strings "inf", "-inf", "nan"; tuples become lists."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [clean(x) for x in v]
    return v


class Recorder:
    """Appends one JSON object per line to ``path``, each with one write() on an O_APPEND descriptor (a kill
    between records never leaves half a line), tagged with the run id and stage."""

    def __init__(self, path: str | Path, run: str, stage: str):
        self.path, self.run, self.stage = Path(path), run, stage
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, kind: str, **fields: Any) -> dict:
        rec = clean({"run": self.run, "stage": self.stage, "kind": kind, "t": round(time.time(), 3), **fields})
        line = (json.dumps(rec, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec


def read_records(path: str | Path, run: str | None = None) -> list[dict]:
    """The records of ``path`` (of one ``run`` when given); a malformed line is skipped."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and (run is None or rec.get("run") == run):
            out.append(rec)
    return out


class Clock:
    """The global deadline: ``SSB_GPU_DEADLINE`` (epoch seconds) minus the summary reserve."""

    def __init__(self, deadline: float, reserve: float = SUMMARY_RESERVE_S):
        self.deadline, self.reserve = deadline, reserve

    @classmethod
    def from_env(cls) -> Clock:
        return cls(float(os.environ["SSB_GPU_DEADLINE"]), float(os.environ.get("SSB_GPU_RESERVE", SUMMARY_RESERVE_S)))

    def left(self) -> float:
        """Seconds a stage may still use."""
        return self.deadline - self.reserve - time.time()


def small_mode() -> bool:
    return os.environ.get("SSB_GPU_SMALL", "0") == "1"


# ---------------------------------------------------------------------------------------------- processes
class Log:
    """Lines to the console and, once the device is known, to ``<slug>-<commit>.log`` (earlier ones buffered)."""

    def __init__(self):
        self.path: Path | None = None
        self.buffer: list[str] = []
        self.lock = threading.Lock()

    def open(self, path: Path) -> None:
        with self.lock:
            self.path = path
            with path.open("a") as f:
                f.writelines(self.buffer)
            self.buffer = []

    def __call__(self, line: str) -> None:
        line = line.rstrip("\n") + "\n"
        with self.lock:
            sys.stdout.write(line)
            sys.stdout.flush()
            if self.path is None:
                self.buffer.append(line)
            else:
                with self.path.open("a") as f:
                    f.write(line)


def run_child(args: list[str], env: dict[str, str], timeout: float, log: Log) -> tuple[int | None, list[str], float]:
    """Run ``python bench/gpu_stages.py *args`` in its own process group, echoing its output to ``log``; kill the
    group after ``timeout`` seconds. Returns (exit code or None when killed, output lines, wall seconds)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, str(HERE / "gpu_stages.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)  # fmt: skip
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            log(f"  | {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        rc = None
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=2.0)
    return rc, lines, time.time() - t0


# ------------------------------------------------------------------------------------------------- summary
def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int | float):
        return format(v, fmt) if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def summary_markdown(recs: list[dict], env: dict, suite_path: Path | None) -> str:
    """Markdown: stages, correctness cases, timings, and the performance table rows (bench/report.py's table)."""
    head = env.get("device", "?")
    lines = [f"# bench/gpu.sh on {head} (commit {env.get('commit', '?')}, run {env.get('run', '?')})", ""]
    lines += [f"Budget {_f(env.get('budget_s'))} s, used {_f(env.get('used_s'), '.0f')} s; small shapes: "
              f"{'yes' if env.get('small') else 'no'}; {env.get('versions', '')}", ""]  # fmt: skip
    if env.get("missing"):
        lines += [f"Not installed here (skipped where needed): {', '.join(env['missing'])}", ""]
    lines += ["| stage | status | wall s | note |", "|---|---|---:|---|"]
    for name in NAMES:
        st = [r for r in recs if r.get("stage") == name and r.get("kind") == "stage" and r.get("status") != "start"]
        r = st[-1] if st else {"status": "not reached"}
        lines.append(f"| {name} | {r['status']} | {_f(r.get('wall_s'), '.1f')} | {r.get('reason', '')} |")
    cases = [r for r in recs if r.get("stage") == "correctness" and r.get("kind") == "result"]
    if cases:
        lines += ["", "Correctness vs eager float64 on the same rounded inputs (worst row; limits: issue 25's targets)",
                  "", "| case | dtype | loss rel | dh rel | other | ok |", "|---|---|---:|---:|---|---|"]  # fmt: skip
        for r in cases:
            other = r.get("ids_agree_ties_aside", r.get("ce_rel_max", ""))
            lines.append(f"| {r['name']} | {r.get('dtype', '-')} | {_f(r.get('loss_rel_max'))} | "
                         f"{_f(r.get('dh_rel_worst'))} | {_f(other)} | {_f(r.get('ok'))} |")  # fmt: skip
    verdict = [r for r in recs if r.get("kind") == "verdict"]
    if verdict:
        lines += ["", f"Correctness verdict: {'PASS' if verdict[-1].get('ok') else 'FAIL'} "
                  f"{verdict[-1].get('failed') or ''}"]  # fmt: skip
    timed = [r for r in recs if r.get("kind") == "result" and "ms_min" in r]
    if timed:
        lines += ["", "Timings: fwd+bwd (top-k: capture), min over rounds after warm-up (CUDA events on a GPU); "
                  "x floor = time / the bare-GEMM floor at the same N (target <= 1.4 for kd at N=8k); memory target "
                  "N*H*12 B + 64 MB", "",
                  "| stage | provider | N | ms | x floor | peak extra MiB | mem target MiB | first call s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in timed:
            lines.append(f"| {r['stage']} | {r.get('provider')} | {r.get('n')} | {_f(r['ms_min'])} | "
                         f"{_f(r.get('x_floor'))} | {_f(r.get('peak_extra_mib'), '.0f')} | "
                         f"{_f(r.get('mem_target_mib'), '.0f')} | {_f(r.get('first_call_s'))} |")  # fmt: skip
    problems = [r for r in recs if r.get("kind") in ("skip", "error")]
    if problems:
        lines += ["", "Skipped or failed items:", ""]
        lines += [f"- {r['stage']} {r.get('name', '')}: {r['kind']}: {r.get('reason') or r.get('error')}"
                  for r in problems]  # fmt: skip
    if suite_path is not None and suite_path.exists():
        try:
            import report

            rows = report.load_rows([suite_path])
            if rows:
                lines += ["", f"table rows (`python bench/report.py {suite_path.name}`):", "", report.table(rows)]
        except Exception as e:  # the summary must not die on the report's account
            lines += ["", f"(performance table rows unavailable: {type(e).__name__}: {e})"]
    return "\n".join(lines) + "\n"


def suite_file(recs: list[dict], env: dict) -> dict:
    """The timings as a bench/measure.py suite (``{"suite", "entries"}``) for bench/report.py and bench/check.py."""
    meta = {k: env.get(k) for k in ("device", "device_type", "commit", "dirty", "time")}
    meta.update(env.get("versions_dict") or {})
    meta["quick"] = bool(env.get("small"))
    entries = {}
    for r in recs:
        if r.get("kind") != "result" or "ms_min" not in r:
            continue
        figures = {"time_ms" if r["stage"] != "topk" else "capture_ms": r["ms_min"],
                   "tokens_per_s": r.get("tokens_per_s"), "peak_extra_mib": r.get("peak_extra_mib"),
                   "first_call_s": r.get("first_call_s")}  # fmt: skip
        figures = {k: v for k, v in figures.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        params = {k: r.get(k) for k in ("stage", "provider", "n", "h", "v", "k", "dtype")}  # what was run, no results
        entries[f"{r['stage']}/{r['name']}"] = {"params": params, "figures": figures, "meta": meta}
    return {"suite": SUITE, "entries": entries}


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:
    small = small_mode()
    budget = float(os.environ.get("SSB_GPU_BUDGET_S") or (180 if small else 480))
    t0 = float(os.environ.get("SSB_GPU_T0") or time.time())
    deadline = t0 + budget
    scale = float(os.environ.get("SSB_GPU_EST_SCALE", "1"))
    pick = [s.strip() for s in os.environ.get("SSB_GPU_STAGES", "").split(",") if s.strip()]
    unknown = [p for p in pick if p not in NAMES]
    if unknown:
        print(f"SSB_GPU_STAGES: unknown stage(s) {unknown}; stages are {', '.join(NAMES)}", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT") or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
    commit = git_commit()
    log = Log()
    env = dict(os.environ, SSB_GPU_DEADLINE=str(deadline), SSB_GPU_RUN=run, SSB_GPU_RESERVE=str(SUMMARY_RESERVE_S))
    log(f"== bench/gpu.sh run {run}: budget {budget:.0f} s, {'small shapes' if small else 'full shapes'}, "
        f"results in {out}")  # fmt: skip

    # the probe: device, slug, versions, what is installed (stage "env"; its record names the files). It gets 30 s
    # even past the deadline: without it nothing, not even a skip, can be recorded under the device's name
    rc, lines, wall = run_child(["env"], env, max(deadline - SUMMARY_RESERVE_S - time.time(), 30.0), log)
    probe: dict[str, Any] = {}
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                probe = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    slug = probe.get("slug") or "unknown-device"
    stem = f"{slug}-{commit}"
    jsonl = out / f"{stem}.jsonl"
    log.open(out / f"{stem}.log")
    env["SSB_GPU_JSONL"] = str(jsonl)
    rec = Recorder(jsonl, run, "env")
    info = {**probe, "commit": commit, "budget_s": budget, "small": small, "out": str(out), "probe_wall_s": wall}
    if rc != 0 or not probe:
        rec.add("env", **info, error=f"the probe failed (rc {rc}): " + " / ".join(lines[-5:]))
        log(f"!! the device probe failed (rc {rc}); nothing can run")
        for s in STAGES:
            Recorder(jsonl, run, s.name).add("stage", status="skipped", reason="the device probe failed")
        return 2
    rec.add("env", **info)
    fatal = None
    if probe.get("device_type") != "cuda" and not small:
        fatal = "no CUDA device: the full shapes need a GPU (SSB_GPU_SMALL=1 TRITON_INTERPRET=1 is the CPU dry run)"
    if probe.get("missing"):
        log(f"== not installed (skipped where needed): {', '.join(probe['missing'])}")

    failed: list[str] = []
    verdict: bool | None = None
    for s in STAGES:
        r = Recorder(jsonl, run, s.name)
        est = (s.est_small_s if small else s.est_s) * scale
        left = deadline - SUMMARY_RESERVE_S - time.time()
        reason = None
        if fatal:
            reason = fatal
        elif pick and s.name not in pick:
            reason = "not selected (SSB_GPU_STAGES)"
        elif left < max(est, 1.0):
            reason = f"budget: {max(left, 0):.0f} s left, the stage needs at least {est:.0f} s"
        elif s.timing and verdict is not True and os.environ.get("SSB_GPU_TIME_ANYWAY") != "1":
            if verdict is False:
                reason = "correctness failed: no benchmarks of wrong kernels (SSB_GPU_TIME_ANYWAY=1 overrides)"
            elif not pick or "correctness" in pick:
                reason = "no correctness verdict in this run: no benchmarks of unchecked kernels"
        if reason:
            r.add("stage", status="skipped", reason=reason)
            log(f"== {s.name}: SKIPPED ({reason})")
            continue
        log(f"== {s.name}: {s.what} ({left:.0f} s left)")
        r.add("stage", status="start", left_s=round(left, 1))
        rc, lines, wall = run_child([s.name], env, left, log)
        if rc is None:
            reason = f"killed at the deadline after {wall:.0f} s (what it wrote before stays)"
            r.add("stage", status="killed", reason=reason, wall_s=round(wall, 1))
            log(f"!! {s.name}: {reason}")
        elif rc != 0:
            tail = " / ".join(x for x in lines[-3:] if x.strip())
            r.add("stage", status="failed", reason=f"exit code {rc}: {tail}"[:2000], wall_s=round(wall, 1))
            failed.append(s.name)
            log(f"!! {s.name}: FAILED (exit code {rc})")
        else:
            r.add("stage", status="done", wall_s=round(wall, 1))
        if s.name == "correctness":
            v = [x for x in read_records(jsonl, run) if x.get("kind") == "verdict"]
            verdict = bool(v[-1].get("ok")) if v else (False if rc not in (None, 0) else None)
            if verdict is False:
                log("#" * 100)
                log(f"## KERNEL CORRECTNESS FAILED on {probe.get('device')}: see {jsonl.name}; timing stages skipped")
                log("#" * 100)

    used = time.time() - t0
    if time.time() < deadline:
        recs = read_records(jsonl, run)
        meta = {**info, "run": run, "used_s": used}
        suite = out / f"{stem}.json"
        data = suite_file(recs, meta)
        if data["entries"]:
            write_json(suite, data)
        md = summary_markdown(recs, meta, suite if data["entries"] else None)
        (out / f"{stem}.md").write_text(md)
        log(md)
        Recorder(jsonl, run, "summary").add("stage", status="done", used_s=round(used, 1), files=[
            p.name for p in (jsonl, out / f"{stem}.log", out / f"{stem}.md", suite) if p.exists()])  # fmt: skip
    else:
        Recorder(jsonl, run, "summary").add("stage", status="skipped", reason="budget spent")
    log(f"== done in {used:.0f} s: {', '.join(sorted(p.name for p in out.glob(stem + '.*')))}")
    if fatal:
        return 2
    return 1 if verdict is False or failed else 0


if __name__ == "__main__":
    sys.exit(main())
