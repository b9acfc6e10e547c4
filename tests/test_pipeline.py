"""Stage-level resume of ``ssb run``: skip what is done and unchanged, redo the rest, keep what completed."""

import json

import pytest

from ssb.config import load_config
from ssb.run.plan import Stage
from ssb.run.runner import StageFailed, run_pipeline


def _plan(calls: list[str], fail: set[str] = frozenset()):
    def make(name):
        def run(cfg):
            calls.append(name)
            if name in fail:
                raise RuntimeError(f"boom in {name}")
            return 0

        return run

    sections = {"rollout": ("model", "data", "rollout"), "curate": ("curate",), "train": ("train",)}
    return [Stage(n, s, make(n)) for n, s in sections.items()]


def test_rerun_skips_done_stages_and_redoes_changed_ones(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    calls: list[str] = []
    run_pipeline(cfg, plan=_plan(calls))
    assert calls == ["rollout", "curate", "train"]
    calls.clear()
    run_pipeline(cfg, plan=_plan(calls))
    assert calls == []
    # a change in curate's section reruns curate and everything downstream, not rollout
    cfg2 = load_config(None, [f"run_dir={tmp_path}", "curate.target_pairs=7"])
    run_pipeline(cfg2, plan=_plan(calls))
    assert calls == ["curate", "train"]
    calls.clear()
    run_pipeline(cfg2, plan=_plan(calls), from_stage="rollout")
    assert calls == ["rollout", "curate", "train"]
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in ("rollout", "curate", "train"))
    assert (tmp_path / "config.yaml").exists()


def test_failure_names_the_stage_and_keeps_completed_ones(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    calls: list[str] = []
    with pytest.raises(StageFailed, match="stage curate failed: RuntimeError: boom in curate"):
        run_pipeline(cfg, plan=_plan(calls, fail={"curate"}))
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["stages"]["rollout"]["status"] == "done"
    assert manifest["stages"]["curate"]["status"] == "failed"
    assert "boom in curate" in manifest["stages"]["curate"]["error"]
    assert "train" not in manifest["stages"]
    calls.clear()
    run_pipeline(cfg, plan=_plan(calls))
    assert calls == ["curate", "train"]


def test_unknown_from_stage_is_an_error(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="--from 'nope'"):
        run_pipeline(cfg, plan=_plan([]), from_stage="nope")
