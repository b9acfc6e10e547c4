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


def _write_counts(layout, pairs: int) -> None:
    layout.rollout.mkdir(parents=True, exist_ok=True)
    layout.curate.mkdir(parents=True, exist_ok=True)
    layout.rollout_stats.write_text(json.dumps({
        "problems": 12, "k": 2,
        "samples": {"total": 24, "correct": 0, "wrong_answer": 4, "no_answer": 7, "truncated": 13},
        "problems_by_correct": {"all_correct": 0, "mixed": 0, "none_correct": 12},
    }))  # fmt: skip
    layout.curate_stats.write_text(json.dumps({"pairs": pairs, "status_counts": {"no_correct": 12, "kept": pairs}}))


@pytest.mark.parametrize("pairs", [0, 3])
def test_a_run_with_nothing_to_distil_stops_after_curate_and_says_why(tmp_path, pairs):
    from ssb.core.layout import RunLayout
    from ssb.run.plan import stage

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    calls: list[str] = []
    plan = _plan(calls)

    def curate(c):
        calls.append("curate")
        _write_counts(RunLayout(tmp_path), pairs)

    plan[1] = Stage("curate", ("curate",), curate, stop_check=stage("curate").stop_check)
    manifest = run_pipeline(cfg, plan=plan)
    if pairs:
        assert calls == ["rollout", "curate", "train"] and manifest["stopped"] is None
        return
    assert calls == ["rollout", "curate"]  # train never ran on an empty store
    reason = json.loads((tmp_path / "run.json").read_text())["stopped"]["reason"]
    assert manifest["stopped"]["after"] == "curate"
    for part in ("0 pairs", "12 problems x 2", "12 problems had no correct sample", "7 without an answer",
                 "13 truncated", "grading.mode=strict"):  # fmt: skip
        assert part in reason
    calls.clear()
    assert run_pipeline(cfg, plan=plan)["stopped"]["after"] == "curate"  # a rerun skips curate and stops again
    assert calls == []
