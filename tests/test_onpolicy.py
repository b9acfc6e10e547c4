"""On-policy sequences (``distill.source``): the student's own samples scored by the hinted teacher (issue 18).

Selection runs on the scripted rollouts of tests/test_curation.py; a reduced two-round ``ssb run`` with
``distill.source=both`` (SSB, then on-policy from the SSB student) runs on the toy model with vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from run_helpers import run_two_rounds
from test_curation import PROBLEMS, make_run

from ssb.config import ConfigError, load_config
from ssb.core.files import InputError
from ssb.onpolicy import SAMPLE_COUNTS, STATUSES, run, select_sequences
from ssb.train.stores import check_one_teacher

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"


def _rollout_texts(run_dir: Path) -> dict[tuple[str, int], dict]:
    return {(r["id"], r["sample"]): r for r in map(json.loads, (run_dir / "rollout/rollouts.jsonl").open())}


def test_every_finished_sample_of_a_mixed_problem_is_scored_with_a_hint_that_is_not_itself(tmp_path):
    cfg, _ = make_run(tmp_path, **{"distill.source": "on_policy"})
    assert run(cfg) == 0
    run_dir = Path(cfg.run_dir)
    stats = json.loads((run_dir / "curate/curation_stats.json").read_text())
    # worked out by hand from PROBLEMS: q0 and q8 have one correct sample (it cannot hint itself), q6 and q9 one
    # wrong one; q1/q4 have no wrong answer, q2/q3 no finished correct one
    assert stats["sample_counts"] == {"scored": 24, "truncated": 0, "no_other_correct": 2, "no_other_wrong": 2,
                                      "over_cap": 0}  # fmt: skip
    assert stats["status_counts"] == {"kept": 7, "no_correct": 2, "no_wrong": 2, "no_hint": 0, "not_reached": 0}
    assert sum(stats["status_counts"].values()) == len(PROBLEMS) and set(stats["status_counts"]) == set(STATUSES)
    assert set(stats["sample_counts"]) == set(SAMPLE_COUNTS) and stats["pairs"] == stats["sequences"] == 24
    teacher = [json.loads(x) for x in (run_dir / "curate/teacher.jsonl").read_text().splitlines()]
    student = [json.loads(x) for x in (run_dir / "curate/student.jsonl").read_text().splitlines()]
    rolls = _rollout_texts(run_dir)
    assert len(teacher) == len(student) == 24
    for t, s in zip(teacher, student, strict=True):
        assert t["source"] == s["source"] == "on_policy" and t["id"] == s["id"] and t["sample"] == s["sample"]
        own = rolls[(t["id"], t["sample"])]
        assert t["messages"][-1]["content"] == s["messages"][-1]["content"] == own["text"]  # the student's sample
        assert own["sample"] not in (t["correct_sample"], t["wrong_sample"])  # never its own hint
        hint_prompt = t["messages"][-2]["content"]
        right, wrong = rolls[(t["id"], t["correct_sample"])], rolls[(t["id"], t["wrong_sample"])]
        assert right["correct"] and not wrong["correct"] and wrong["text"] in hint_prompt
        assert s["messages"][-2]["content"] in {q for q in PROBLEMS}  # the student sees the bare question
        assert t["correct"] == own["correct"]


def test_max_sequences_caps_and_counts_what_it_left(tmp_path):
    cfg, _ = make_run(tmp_path, **{"distill.source": "on_policy", "distill.max_sequences": 5})
    seqs, stats = select_sequences(cfg)
    assert len(seqs) == 5 and stats["stop_reason"] == "cap_reached"
    assert stats["sample_counts"]["over_cap"] > 0
    assert stats["status_counts"]["not_reached"] > 0 and sum(stats["status_counts"].values()) == len(PROBLEMS)


@pytest.mark.parametrize(
    "overrides,match",
    [(["distill.source=both"], "rounds >= 2"), (["distill.source=offline"], "distill.source"),
     (["train.divergence=reverse_kl", "train.variant=renorm"], "renorm"), (["train.jsd_beta=1.0"], "jsd_beta"),
     (["distill.max_sequences=-1"], "max_sequences")],
)  # fmt: skip
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIG, overrides)


def test_stores_of_different_teachers_are_refused_unless_allowed():
    def store(path, **teacher):
        return SimpleNamespace(path=path, manifest={"model": {"id": teacher["model"]}, "teacher": teacher})

    same = {"model": "base", "template": "t1", "weights": "w"}
    check_one_teacher([store("a", **same), store("b", **same)])
    with pytest.raises(InputError, match=r"b/manifest.json: teacher template differ .*'t2' vs 't1'.*allow_teacher_mix"):
        check_one_teacher([store("a", **same), store("b", **{**same, "template": "t2"})])
    # an older store without a teacher record is compared on its model id
    old = SimpleNamespace(path="c", manifest={"model": {"id": "other"}})
    with pytest.raises(InputError, match="teacher model differ"):
        check_one_teacher([store("a", **same), old])


REDUCED = ["data.limit=16", "curate.target_pairs=6", "curate.attempts=4", "train.max_steps=2", "train.batch_size=4",
           "eval.limit=8", "eval.n=1", "eval.bootstrap=100", "rounds=2", "distill.source=both",
           "distill.max_sequences=12", "train.divergence=reverse_kl"]  # fmt: skip


@pytest.mark.vllm
@pytest.mark.slow
def test_ssb_then_on_policy_from_the_ssb_student_end_to_end(tmp_path):
    out = tmp_path / "run"
    run_two_rounds(out, CONFIG, REDUCED)
    round2 = out / "round2"
    s1 = json.loads((out / "curate/curation_stats.json").read_text())
    s2 = json.loads((round2 / "curate/curation_stats.json").read_text())
    assert "source" not in s1 and s1["pairs"] > 0  # round 1: SSB's robust solutions
    assert s2["source"] == "on_policy" and 0 < s2["sequences"] <= 12
    m1 = json.loads((out / "capture/manifest.json").read_text())
    m2 = json.loads((round2 / "capture/manifest.json").read_text())
    assert m1["distilled"]["source"] == "robust" and m2["distilled"]["source"] == "on_policy"
    assert len(m2["distilled"]["sequences"]) == s2["sequences"] and all("#" in x for x in m2["distilled"]["sequences"])
    assert m1["teacher"] == m2["teacher"] and m1["teacher"]["template"]  # one teacher and template throughout
    # round 2's samples are the SSB student's: its rollouts ran on the merged round-1 student
    assert yaml.safe_load((round2 / "rollout/config.yaml").read_text())["model"]["name_or_path"] == str(out / "student")
    rolls = _rollout_texts(round2)
    for t in map(json.loads, (round2 / "curate/teacher.jsonl").open()):
        assert t["messages"][-1]["content"] == rolls[(t["id"], t["sample"])]["text"]
    facts = json.loads((round2 / "train/train_facts.json").read_text())
    assert facts["examples"] == s1["pairs"] + m2["counts"]["examples"]
    metrics = [json.loads(x) for x in (round2 / "train/metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["loss"] == m["loss"] and abs(m["loss"]) < 1e6 for m in metrics if "loss" in m)
    assert yaml.safe_load((round2 / "train/config.yaml").read_text())["train"]["divergence"] == "reverse_kl"
