"""``ssb curate --compare-templates`` on the embedded toy model: every template's premise report on held-out
training problems, a best template named, and the test split never read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssb.config import ConfigError, load_config
from ssb.core import data
from ssb.core.prompts import TEMPLATES
from ssb.curate import templates
from ssb.run import templates as template_plan
from ssb.run.interrupt import Interrupted

pytestmark = pytest.mark.vllm


def _cfg(tmp_path: Path, *extra: str):
    overrides = [f"run_dir={tmp_path / 'run'}", "curate.val_problems=12", "curate.attempts=2", "rollout.k=4"]
    return load_config("configs/toy.yaml", [*overrides, *extra])


def _compare(tmp_path: Path, engine, monkeypatch) -> dict:
    """The comparison on 12 held-out toy problems, checked; its result."""
    reads = []
    load = data.load_problems

    def spy(source, split=None, **kw):
        reads.append((source, split, kw.get("limit")))
        return load(source, split, **kw)

    monkeypatch.setattr(data, "load_problems", spy)
    cfg = _cfg(tmp_path)
    assert template_plan.run(cfg, engine=engine) == 0
    assert reads == [("toy", "train", 300 + 12)]  # the train split only; its first 300 are the run's, not used
    result = json.loads((Path(cfg.run_dir) / template_plan.OUT_NAME).read_text())
    v = result["validation"]
    assert v["ids"] == [f"toy/train/{i}" for i in range(300, 312)] and v["split"] == "train"
    assert set(result["templates"]) == set(TEMPLATES)
    for row in result["templates"].values():
        p = row["premise"]
        if p["problems"]:
            assert p["bare"]["attempts"] == 4 * p["problems"] and p["hinted"]["attempts"] == 2 * p["problems"]
    # the toy teacher was pretrained on the paper's hinted view only: that view is the one that works
    assert result["best"] in TEMPLATES and result["best"] == "paper"
    assert result["templates"]["paper"]["premise"]["verdict"] == "better"
    text = templates.render(result)
    assert "best: paper" in text and all(name in text for name in TEMPLATES)
    return result


def test_compare_templates_on_the_toy_names_one_and_never_reads_the_test_split(tmp_path, vllm_engine, monkeypatch):
    assert _compare(tmp_path, vllm_engine, monkeypatch)["best"] == "paper"


def test_a_template_killed_mid_comparison_resumes_without_redoing_the_others(
    tmp_path, vllm_engine, monkeypatch, capsys
):
    """The comparison is a plan of the runner: a template that fails leaves the bare samples and the finished
    templates on disk, and the rerun redoes only what is left, to the same result as an unbroken run."""
    whole = _compare(tmp_path / "whole", vllm_engine, monkeypatch)
    report = templates.template_report
    calls = []

    def dies_on_the_second(cfg, engine, name, pairs, bare):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a kill mid-template leaves: its stage never finished
        return report(cfg, engine, name, pairs, bare)

    monkeypatch.setattr(templates, "template_report", dies_on_the_second)
    cfg = _cfg(tmp_path / "broken")
    with pytest.raises(Interrupted):
        template_plan.run(cfg, engine=vllm_engine)
    first, second, *rest = TEMPLATES
    capsys.readouterr()
    calls.clear()
    monkeypatch.setattr(templates, "template_report", lambda *a: calls.append(a[2]) or report(*a))
    assert template_plan.run(cfg, engine=vllm_engine) == 0
    err = capsys.readouterr().err
    assert calls == [second, *rest]  # the first template and the bare samples were not redone
    assert "validation: done, inputs unchanged, skipped" in err and f"template_{first}: done" in err
    assert json.loads((Path(cfg.run_dir) / template_plan.OUT_NAME).read_text())["templates"] == whole["templates"]


def test_compare_templates_refuses_the_test_split_and_a_run_without_held_out_problems(tmp_path):
    with pytest.raises(ConfigError, match="test split is never used"):
        templates.validation_problems(_cfg(tmp_path, "data.split=test"))
    with pytest.raises(ConfigError, match="data.limit"):
        templates.validation_problems(_cfg(tmp_path, "data.limit=null"))


def test_best_template_skips_the_ones_cut_more_than_bare():
    def row(acc: float, verdict: str, cut: float = 0.1) -> dict:
        return {"premise": {"verdict": verdict, "hinted": {"accuracy": {"value": acc}, "truncation": {"value": cut}}}}

    rows = {"paper": row(0.5, "better"), "short": row(0.9, "truncates_more"), "multiturn": row(0.6, "better")}
    assert templates.best_template(rows) == "multiturn"
    rows["multiturn"] = row(0.2, "not_more_accurate")
    assert templates.best_template(rows) == "paper"
    assert templates.best_template({"short": row(0.9, "truncates_more")}) is None
    # an accuracy tie goes to the template cut least (SmolLM2's seed 0: short and multiturn both at 38.6%)
    tie = {"short": row(0.386, "better", cut=0.193), "multiturn": row(0.386, "better", cut=0.091)}
    assert templates.best_template(tie) == "multiturn"


def test_cli_has_the_flag():
    from ssb.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["curate", "--config", "toy", "--compare-templates"])
    assert args.compare_templates and args.stage == "curate"
