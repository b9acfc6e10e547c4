"""The Python API (``ssb.load_config``, ``ssb.run_stage``, ``ssb.run_pipeline``): the CLI's calls, from Python."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_curation import PROBLEMS, ScriptedEngine

import ssb
from ssb.config import ConfigError
from ssb.config import load_config as load_yaml

REPO = Path(__file__).resolve().parents[1]


def test_import_ssb_stays_light():
    code = (
        "import sys, ssb; print(json.dumps(sorted(m for m in ('torch', 'ssb.run', 'ssb.config') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    assert ssb.__version__ and {"load_config", "run_stage", "run_pipeline"} <= set(dir(ssb))
    with pytest.raises(AttributeError):
        ssb.no_such_thing  # noqa: B018


def test_load_config_by_name_or_path(monkeypatch):
    monkeypatch.chdir(REPO)
    by_name = ssb.load_config("toy", overrides=["run_dir=runs/api", "train.lr=0.001"])
    assert by_name == load_yaml(REPO / "configs" / "toy.yaml", ["run_dir=runs/api", "train.lr=0.001"])
    assert ssb.load_config(REPO / "configs" / "toy.yaml") == load_yaml(REPO / "configs" / "toy.yaml")
    assert ssb.load_config() == load_yaml(None)
    with pytest.raises(ConfigError, match="no configs/nope.yaml.*toy"):
        ssb.load_config("nope")
    with pytest.raises(ConfigError, match="train.nope"):
        ssb.load_config("toy", overrides=["train.nope=1"])


def test_run_stage_runs_the_stages_as_the_cli_does(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": q, "answer": f"#### {a}"}) + "\n"
                            for i, (q, (a, _, _)) in enumerate(PROBLEMS.items())))  # fmt: skip
    cfg = ssb.load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.source={data}", "rollout.k=4"])
    engine = ScriptedEngine(*({q: v[i] for q, v in PROBLEMS.items()} for i in (1, 2, 0)))
    assert ssb.stage_names() == ["rollout", "curate", "capture", "train", "eval"]
    assert ssb.run_stage("rollout", cfg, engine=engine) == 0
    assert ssb.run_stage("curate", cfg, engine=engine) == 0
    stats = json.loads((tmp_path / "run" / "curate" / "curation_stats.json").read_text())
    assert stats["pairs"] > 0 and stats["problems"] == len(PROBLEMS)
    with pytest.raises(ValueError, match="unknown stage 'train_all'"):
        ssb.run_stage("train_all", cfg)


def test_run_pipeline_is_ssb_run(monkeypatch):
    from ssb.run import runner

    calls = []
    monkeypatch.setattr(runner, "run", lambda cfg, from_stage=None: calls.append((cfg, from_stage)) or 0)
    cfg = ssb.load_config()
    assert ssb.run_pipeline(cfg, from_stage="train") == 0 and calls == [(cfg, "train")]
