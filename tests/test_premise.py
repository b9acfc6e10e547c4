"""SSB's premise and honest solutions, with scripted engines (no model): the bare-vs-hinted report and its verdicts,
``ssb run`` stopping after curate (exit 3, one line) unless overridden, and every rejection reason counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_curation import PROBLEMS, ScriptedEngine, make_run

from ssb.core.prompts import TEMPLATES, leaked_phrase
from ssb.curate import run, run_curation
from ssb.curate.judge import Judge, judge_solution, repeated_ngram
from ssb.curate.premise import is_better, premise_report
from ssb.engines import Completion


def _rollouts(n_problems: int, correct: int, k: int = 4, cut: int = 0) -> dict[str, list[dict]]:
    """Per problem ``k`` bare samples: ``correct`` right, ``cut`` truncated, the rest wrong."""
    out = {}
    for i in range(n_problems):
        out[f"p{i}"] = [
            {"id": f"p{i}", "sample": j, "correct": j < correct, "finish_reason": "length" if j >= k - cut else "stop"}
            for j in range(k)
        ]
    return out


def _decisions(n_problems: int, statuses: list[str]) -> list[dict]:
    return [{"id": f"p{i}", "status": statuses[0], "attempt_statuses": list(statuses)} for i in range(n_problems)]


def test_premise_counts_per_attempt_with_cis():
    rep = premise_report(_decisions(10, ["kept", "leaks_hint", "robust_wrong", "truncated"]), _rollouts(10, 1, cut=1))
    assert rep["problems"] == 10
    assert {k: rep["bare"][k] for k in ("correct", "attempts", "truncated")} == {
        "correct": 10, "attempts": 40, "truncated": 10,
    }  # fmt: skip
    # a reply rejected for leaking the hint still had the right answer: the premise measures the policy, not the filter
    assert {k: rep["hinted"][k] for k in ("correct", "attempts", "truncated")} == {
        "correct": 20, "attempts": 40, "truncated": 10,
    }  # fmt: skip
    assert rep["bare"]["accuracy"]["value"] == pytest.approx(0.25) and rep["hinted"]["accuracy"]["value"] == 0.5
    for side in ("bare", "hinted"):
        lo, hi = rep[side]["accuracy"]["ci"]
        assert lo <= rep[side]["accuracy"]["value"] <= hi
    assert rep["verdict"] == "better" and is_better(rep)
    assert "bare 25.0% correct" in rep["line"] and "hinted 50.0% correct" in rep["line"]


@pytest.mark.parametrize(
    "bare_correct, hinted, verdict",
    [
        (1, ["kept", "kept"], "better"),
        (2, ["robust_wrong", "kept"], "not_more_accurate"),  # equal accuracy is not better
        (1, ["robust_wrong", "no_boxed_answer"], "not_more_accurate"),
        (1, ["kept", "kept", "truncated"], "truncates_more"),  # more accurate, but cut on every problem
    ],
)
def test_premise_verdicts(bare_correct, hinted, verdict):
    rep = premise_report(_decisions(12, hinted), _rollouts(12, bare_correct))
    assert rep["verdict"] == verdict
    assert is_better(rep) == (verdict == "better")
    assert ("NOT better" in rep["line"]) == (verdict != "better")


def test_premise_with_no_hinted_sample_says_so_and_does_not_stop():
    rep = premise_report([{"id": "p0", "status": "prompt_too_long", "solution": None}], _rollouts(1, 1))
    assert rep["verdict"] == "no_attempts" and is_better(rep) and "not measured" in rep["line"]


def test_each_rejection_reason():
    gold = "4"
    leak = "The correct answer to the math problem is \\boxed{4}."
    loop = "We add 2 and 2 to get 4. " * 3 + "\\boxed{4}"
    assert judge_solution("2 + 2 = 4, so \\boxed{4}", "stop", gold) == "kept"
    assert judge_solution("2 + 2 = 4, so \\boxed{4}", "length", gold) == "truncated"  # cut: never kept
    assert judge_solution(leak, "stop", gold) == "leaks_hint"
    assert judge_solution(loop, "stop", gold) == "repeats"
    assert judge_solution(loop, "stop", gold, "strict") == Judge(repeat_ngram=8, repeat_max=2)(loop, "stop", gold)
    assert Judge(repeat_ngram=0)(loop, "stop", gold) == "kept"  # repeat_ngram=0: no repetition check
    assert Judge(repeat_max=3)(loop, "stop", gold) == "kept"
    assert repeated_ngram("a b c a b c a b c", 3, 2) == "a b c" and repeated_ngram("a b c a b c", 3, 2) is None
    # each template's own wording
    assert leaked_phrase("As the students showed", TEMPLATES["paper"]) == "student"
    assert leaked_phrase("Let's solve it again: 2 + 2 = 4", TEMPLATES["multiturn"]) == "solve it again"
    assert leaked_phrase("Let's solve it again: 2 + 2 = 4", TEMPLATES["paper"]) is None
    assert leaked_phrase("The given solution adds", TEMPLATES["short"]) == "given solution"
    assert leaked_phrase('Careful: "each" means we multiply, not add.') is None  # the toy's robust caution is honest


class HonestyEngine(ScriptedEngine):
    """The scripted engine with two more robust-solution kinds: "leak" (right answer, quotes the hint) and "loop"."""

    def close(self) -> None:
        pass

    @staticmethod
    def _robust(verdict: str, gold: str) -> Completion:
        if verdict == "leak":
            return Completion(f"Both students agree the answer is \\boxed{{{gold}}}", (7,) * 9, "stop")
        if verdict == "loop":
            return Completion("so we add one more. " * 4 + f"\\boxed{{{gold}}}", (7,) * 9, "stop")
        return ScriptedEngine._robust(verdict, gold)


def test_every_rejection_is_counted_in_the_stats_and_on_the_terminal(tmp_path, capsys):
    cfg, engine = make_run(tmp_path, **{"curate.target_pairs": 100})
    engine.__class__ = HonestyEngine
    engine.robust["q8 tie"], engine.robust["q9 fine"] = "leak", "loop"
    assert run(cfg, engine=engine) == 0
    stats = json.loads((Path(cfg.run_dir) / "curate/curation_stats.json").read_text())
    assert stats["rejections"] == {"truncated": 1, "no_boxed_answer": 1, "robust_wrong": 1, "leaks_hint": 1,
                                   "repeats": 1, "prompt_too_long": 0}  # fmt: skip
    counts = {k: v for k, v in stats["status_counts"].items() if v}
    assert counts == {"no_correct": 2, "no_wrong": 2, "robust_wrong": 1, "no_boxed_answer": 1, "truncated": 1,
                      "leaks_hint": 1, "repeats": 1, "kept": 2}  # fmt: skip
    assert stats["pairs"] == 2 and stats["template"]["name"] == "paper"
    teacher = (Path(cfg.run_dir) / "curate/teacher.jsonl").read_text()
    assert "students agree" not in teacher and "one more. so" not in teacher
    premise = stats["premise"]
    assert set(premise) >= {"bare", "hinted", "verdict"}
    assert {"correct", "attempts", "truncated"} <= set(premise["bare"]) & set(premise["hinted"])
    err = capsys.readouterr().err
    assert "leaks_hint': 1" in err and "repeats': 1" in err and "premise on 7 problems" in err


def _engine_patch(monkeypatch, engine) -> None:
    import ssb.curate
    import ssb.rollout

    monkeypatch.setattr(ssb.rollout, "make_engine", lambda *a, **k: engine)
    monkeypatch.setattr(ssb.curate, "make_engine", lambda *a, **k: engine)


def _weak_teacher(tmp_path: Path):
    """A run whose hinted teacher is right on one problem only (bare: 14 of 28 samples on those problems)."""
    cfg, engine = make_run(tmp_path, **{"curate.target_pairs": 100})
    engine.__class__ = HonestyEngine
    for q in PROBLEMS:
        engine.robust[q] = "ok" if q.startswith("q0 ") else "wrong"
    return cfg, engine


def test_run_stops_after_curate_when_the_hinted_view_is_not_better(tmp_path, monkeypatch, capsys):
    from ssb.run.runner import EXIT_STOPPED
    from ssb.run.runner import run as ssb_run

    cfg, engine = _weak_teacher(tmp_path)
    _engine_patch(monkeypatch, engine)
    assert ssb_run(cfg) == EXIT_STOPPED == 3
    manifest = json.loads((Path(cfg.run_dir) / "run.json").read_text())
    assert manifest["stopped"]["after"] == "curate" and "capture" not in manifest["stages"]
    lines = [x for x in capsys.readouterr().err.splitlines() if "stopped after curate:" in x]
    assert len(lines) == 1 and "NOT better" in lines[0] and "require_better_teacher=false" in lines[0]
    assert "bare 50.0% correct" in lines[0] and "hinted 14.3% correct" in lines[0]


def test_require_better_teacher_false_goes_on(tmp_path, monkeypatch):
    import dataclasses

    from ssb.run.plan import stage
    from ssb.run.runner import run_pipeline

    cfg, engine = _weak_teacher(tmp_path)
    cfg = dataclasses.replace(cfg, curate=dataclasses.replace(cfg.curate, require_better_teacher=False))
    _engine_patch(monkeypatch, engine)
    manifest = run_pipeline(cfg, plan=[stage("rollout"), stage("curate")])
    assert manifest["stopped"] is None
    stats = json.loads((Path(cfg.run_dir) / "curate/curation_stats.json").read_text())
    assert stats["premise"]["verdict"] == "not_more_accurate" and stats["pairs"] == 1


def test_premise_of_a_finished_curation(tmp_path):
    """On the shared scripted problems the hinted teacher (4 of 7 right, 1 cut) beats the bare model (14 of 28)."""
    cfg, engine = make_run(tmp_path, **{"curate.target_pairs": 100})
    premise = run_curation(cfg, engine=engine)["premise"]
    assert premise["problems"] == 7
    assert (premise["bare"]["correct"], premise["bare"]["attempts"], premise["bare"]["truncated"]) == (14, 28, 0)
    assert (premise["hinted"]["correct"], premise["hinted"]["attempts"], premise["hinted"]["truncated"]) == (4, 7, 1)
    assert premise["verdict"] == "better"  # one cut problem of seven: not beyond the CI
