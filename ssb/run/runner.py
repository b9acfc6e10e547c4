"""``ssb run``: every stage in order into one run directory, resumable at stage granularity.

``RUN_DIR/run.json`` records, per stage, its status, timings and the hash of the config it ran with (its
own section and everything upstream). A rerun skips a completed stage whose hash is unchanged and whose outputs
are still on disk and sound (:mod:`ssb.run.outputs`), and redoes the rest, saying why; ``--from STAGE`` forces a
restart there. A failure leaves completed stages intact and names the stage that failed; an interrupt (Ctrl-C,
SIGTERM) records the stage as ``interrupted`` (:mod:`ssb.run.interrupt`). The stages come from
:mod:`ssb.run.plan`; ``ssb demo`` (:mod:`ssb.run.demo`) builds on this.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

from ssb.config import SSBConfig, config_hash, config_to_dict, save_config
from ssb.core.files import atomic_write_json, sha256_text
from ssb.core.layout import RunLayout
from ssb.engines import dp as data_parallel
from ssb.run import interrupt
from ssb.run.plan import STAGES, Stage, expand


class StageFailed(RuntimeError):
    """A stage raised or returned non-zero; completed stages stay on disk. ``stage`` names it."""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


EXIT_STOPPED = 3  # ``ssb run`` stopped early on purpose (nothing to distil): not a failure, not a full run


def stage_hashes(cfg: SSBConfig, plan: list[Stage]) -> dict[str, str]:
    """Cumulative config hash per stage: a change upstream invalidates everything downstream."""
    out: dict[str, str] = {}
    seen: list[str] = [repr(cfg.seed)]
    for stage in plan:
        seen.extend(json.dumps(config_to_dict(getattr(cfg, s)), sort_keys=True) for s in stage.sections)
        if stage.upstream is not None:
            seen.append(json.dumps(stage.upstream(cfg), sort_keys=True))
        out[stage.name] = sha256_text("\n".join(seen))[:16]
    return out


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers", "peft", "vllm", "triton", "ssb"):
        try:
            versions[mod] = importlib.import_module(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            continue
    return versions


def load_manifest(run_dir: Path) -> dict:
    path = RunLayout(run_dir).manifest
    if not path.exists():
        return {"stages": {}}
    return json.loads(path.read_text())


def run_pipeline(
    cfg: SSBConfig,
    *,
    from_stage: str | None = None,
    plan: list[Stage] | None = None,
) -> dict:
    """Run the stages of ``plan`` (default: all of :data:`STAGES`) into ``cfg.run_dir``; return run.json.

    With ``cfg.rounds > 1`` the rollout..train stages repeat once per extra round (:mod:`ssb.run.rounds`)."""
    plan = expand(STAGES if plan is None else plan, cfg.rounds)
    names = [stage.name for stage in plan]
    if from_stage is not None and from_stage not in names:
        raise ValueError(f"--from {from_stage!r}: expected one of {names}")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    manifest = load_manifest(run_dir)
    manifest.update(config_hash=config_hash(cfg), versions=_versions())
    manifest.pop("interrupted", None)  # an earlier run's; this run records its own
    hashes = stage_hashes(cfg, plan)
    forced = False
    stale = False
    for stage in plan:
        name = stage.name
        rec = manifest["stages"].get(name, {})
        forced = forced or name == from_stage
        if not forced and not stale and rec.get("status") == "done" and rec.get("config_hash") == hashes[name]:
            problem = stage.check(cfg) if stage.check else None
            if problem is None:
                print(f"[ssb run] {name}: done, inputs unchanged, skipped (outputs verified)", file=sys.stderr)
                if _stopped(cfg, stage, plan, manifest):
                    break
                continue
            print(f"[ssb run] {name}: done before, but {problem}; redoing it", file=sys.stderr)
        stale = True  # everything after a rerun stage reruns too
        resuming = " (interrupted last time: resuming)" if rec.get("status") == "interrupted" else ""
        rec = {"status": "running", "config_hash": hashes[name], "started": time.time()}
        manifest["stages"][name] = rec
        atomic_write_json(RunLayout(run_dir).manifest, manifest)
        print(f"[ssb run] {name}: running{resuming}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            rc = stage.run(cfg, **stage.pipeline)
            if rc:
                raise StageFailed(f"stage {name} exited with status {rc}", name)
        except BaseException as e:
            rec.update(status="failed", seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
            if isinstance(e, KeyboardInterrupt) or interrupt.requested():  # also when a library wrapped it
                rec.pop("error")
                interrupt.record(run_dir, name, manifest)
                raise interrupt.Interrupted(name) from e
            rec["traceback"] = traceback.format_exc(limit=8)
            atomic_write_json(RunLayout(run_dir).manifest, manifest)
            if isinstance(e, StageFailed):
                raise
            raise StageFailed(
                f"stage {name} failed: {type(e).__name__}: {e} (details in {RunLayout(run_dir).manifest})", name
            ) from e
        rec.update(status="done", seconds=time.perf_counter() - t0, finished=time.time())
        atomic_write_json(RunLayout(run_dir).manifest, manifest)
        if _stopped(cfg, stage, plan, manifest):
            break
    else:
        manifest["stopped"] = None
        atomic_write_json(RunLayout(run_dir).manifest, manifest)
    return manifest


def run_stage(stage: Stage, cfg: SSBConfig, **options) -> int:
    """One stage alone (``ssb rollout``, ``ssb capture``, ...): an interrupt is recorded in ``run.json``."""
    try:
        return int(data_parallel.run_stage(stage.name, cfg.engine, lambda: stage.run(cfg, **options)) or 0)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or interrupt.requested():
            interrupt.record(cfg.run_dir, stage.name)
            raise interrupt.Interrupted(stage.name) from e
        raise


def _stopped(cfg: SSBConfig, stage: Stage, plan: list[Stage], manifest: dict) -> bool:
    """Ask ``stage.stop_check``; on a reason, record it in run.json (dropping later stages' records) and say so."""
    reason = stage.stop_check(cfg) if stage.stop_check else None
    if reason is None:
        return False
    manifest["stopped"] = {"after": stage.name, "reason": reason}
    for later in plan[plan.index(stage) + 1 :]:  # records of an earlier run's later stages no longer hold
        manifest["stages"].pop(later.name, None)
    atomic_write_json(RunLayout(cfg.run_dir).manifest, manifest)
    print(f"[ssb run] stopped after {stage.name}: {reason}", file=sys.stderr)
    return True


def run(cfg: SSBConfig, *, from_stage: str | None = None) -> int:
    """``ssb run``: all stages. A failed stage raises :class:`StageFailed` (the CLI prints it in one line); a run
    stopped on purpose (nothing to distil) returns :data:`EXIT_STOPPED`."""
    manifest = run_pipeline(cfg, from_stage=from_stage)
    if manifest.get("stopped"):
        print(
            f"ssb run: stopped after {manifest['stopped']['after']} (see {RunLayout(cfg.run_dir).manifest})",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    return 0
