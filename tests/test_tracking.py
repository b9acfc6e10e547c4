"""``train.report_to``: TensorBoard event files carry exactly the figures of ``metrics.jsonl`` (and eval summaries)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_trainer import make_cfg, make_examples, metrics, tiny_model_dir  # noqa: F401 (fixture)

from ssb.config import ConfigError, load_config
from ssb.core.tracking import Tracker, eval_scalars
from ssb.train import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def scalars(log_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    student, teacher = tiny_model_dir(tmp_path, 0), tiny_model_dir(tmp_path, 1)
    run = tmp_path / "run"
    cfg = make_cfg(student, run, max_steps=3, report_to=["tensorboard"])
    train(cfg, run, examples=make_examples(teacher, 6))
    rows = metrics(run)
    tb = scalars(run / "train" / "tb")
    assert len(rows) == 3 and set(tb) == {f"train/{k}" for k in rows[0]}
    for row in rows:
        for key, value in row.items():  # TensorBoard stores float32
            assert tb[f"train/{key}"][row["step"]] == np.float32(value), (key, row["step"])


def test_no_tracker_by_default_and_unknown_ones_rejected(tmp_path):
    assert load_config(None, []).train.report_to == ()
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, ['train.report_to=["mlflow"]'])


def test_eval_summary_logged_per_benchmark(tmp_path):
    agg = {"n_problems": 4, "n_samples": 2, "pass@k": {"1": {"value": 0.25, "ci": [0, 1]}, "2": {"value": 0.5}},
           "maj@k": {"1": {"value": 0.25}, "2": {"value": 0.25}}, "pass@1_by_mode": {"strict": {"value": 0.2}},
           "truncation_rate": 0.0, "mean_tokens_wrong": float("nan")}  # fmt: skip
    results = {"label": "ssb", "benchmarks": {"gsm8k": {"aggregates": agg, "problems": []}}}
    tracker = Tracker(["tensorboard"], tmp_path)
    tracker.log_eval(results)
    tracker.close()
    tb = scalars(tmp_path / "tb")
    want = {"pass@1": 0.25, "pass@2": 0.5, "maj@1": 0.25, "maj@2": 0.25, "pass@1_strict": 0.2, "n_problems": 4,
            "n_samples": 2, "truncation_rate": 0.0}  # fmt: skip
    assert eval_scalars(agg) == want
    assert {k: v[0] for k, v in tb.items()} == {f"eval/ssb/gsm8k/{k}": np.float32(v) for k, v in want.items()}


def test_eval_stage_logs_results_json_figures(tmp_path, monkeypatch):
    from test_eval import ScriptedEngine, _bench

    from ssb.eval import run as run_eval

    bench = _bench(tmp_path)
    monkeypatch.setattr("ssb.engines.make_engine", lambda *a, **kw: ScriptedEngine())
    overrides = ["eval.protocol=r1", "eval.n=2", "eval.grader_workers=0", "eval.bootstrap=10", "engine.batch_size=5"]
    overrides += [f"run_dir={tmp_path / 'run'}", f"eval.benchmarks=[{bench}]", "train.report_to=[tensorboard]"]
    cfg = load_config(None, overrides)
    assert run_eval(cfg) == 0
    out = tmp_path / "run" / "eval"
    agg = json.loads((out / "base" / "results.json").read_text())["benchmarks"][bench]["aggregates"]
    tb = scalars(out / "tb")
    assert tb[f"eval/base/{bench}/pass@1"][0] == np.float32(agg["pass@k"]["1"]["value"])
    assert tb[f"eval/base/{bench}/maj@2"][0] == np.float32(agg["maj@k"]["2"]["value"])


def test_wandb_gets_the_same_figures_offline_by_default(tmp_path, monkeypatch):
    """wandb is optional (not installed here): a stand-in module records what the tracker sends it."""
    import importlib.machinery
    import sys
    import types

    runs = []

    class Run:
        def __init__(self, **kw):
            self.init, self.logged, self.finished = kw, [], False
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: Run(**kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "unset")  # so that undo removes what the tracker sets
    monkeypatch.delenv("WANDB_MODE")
    tracker = Tracker(["wandb"], tmp_path, run_name="r", config={"train": {"lr": 1.0}})
    tracker.log({"step": 0, "loss": 1.5, "note": "text"}, 0)
    tracker.close()
    assert os.environ["WANDB_MODE"] == "offline"
    (run,) = runs
    assert run.init["dir"] == str(tmp_path) and run.init["config"] == {"train": {"lr": 1.0}} and run.finished
    assert run.logged == [(0, {"train/step": 0.0, "train/loss": 1.5})]
