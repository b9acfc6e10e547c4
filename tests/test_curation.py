"""Curation logic with a scripted engine (no model): pair choice, tie-breaking, filters, stats, resume, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ssb.config import SSBConfig, load_config
from ssb.core.files import InputError
from ssb.core.layout import RunLayout
from ssb.core.rollouts import read_rollouts
from ssb.curate import STATUSES, choose_pair, judge_solution, run_curation
from ssb.engines import Completion, Sampling, sample_seeds
from ssb.rollout import run_rollouts


class ScriptedEngine:
    """Answers from a script keyed by the question text: rollouts by sample index, robust solutions by verdict.

    ``rollouts[q]`` is a list of K strings: "=N" a boxed N, "?" no box, "~N" boxed N but truncated.
    ``robust[q]`` is "ok" (boxed gold), "wrong", "nobox" or "long" (truncated).
    """

    backend = "scripted"
    tokenizer = None

    def __init__(self, rollouts: dict[str, list[str]], robust: dict[str, str], golds: dict[str, str]):
        self.rollouts, self.robust, self.golds = rollouts, robust, golds
        self.calls: list[int] = []

    def generate(self, conversations, sampling: Sampling, *, lora=None, seed_keys=None, desc="generate"):
        sample_seeds(sampling, len(conversations), seed_keys)  # same validation as the real engines
        self.calls.append(len(conversations))
        out = []
        for conv in conversations:
            user = conv[-1]["content"]
            if user in self.rollouts:
                out.append([self._rollout(s) for s in self.rollouts[user][: sampling.n]])
            else:
                q = next(q for q in self.robust if q in user)  # hinted prompt quotes the question
                out.append([self._robust(self.robust[q], self.golds[q])])
        return out

    @staticmethod
    def _rollout(spec: str) -> Completion:
        if spec == "?":
            return Completion("I am not sure.", (1, 2, 3), "stop")
        text = f"so the answer is \\boxed{{{spec[1:]}}}"
        return Completion(text, (1,) * 5, "length" if spec[0] == "~" else "stop")

    @staticmethod
    def _robust(verdict: str, gold: str) -> Completion:
        text = {"ok": f"Step 1. Careful. \\boxed{{{gold}}}", "wrong": "\\boxed{-1}", "nobox": "no answer"}.get(
            verdict, ""
        )
        return Completion(text or f"\\boxed{{{gold}}}", (7,) * 9, "length" if verdict == "long" else "stop")


PROBLEMS = {  # question -> (gold, rollouts, robust verdict)
    "q0 two plus two": ("4", ["=4", "=5", "=5", "=3"], "ok"),
    "q1 all right": ("1", ["=1", "=1", "=1", "=1"], "ok"),
    "q2 all wrong": ("2", ["=3", "=9", "?", "=3"], "ok"),
    "q3 truncated correct": ("3", ["~3", "=4", "=4", "?"], "ok"),  # truncated correct never counts
    "q4 only unboxed wrong": ("4", ["=4", "?", "?", "~5"], "ok"),
    "q5 robust wrong": ("5", ["=5", "=6", "=7", "=5"], "wrong"),
    "q6 robust unboxed": ("6", ["=6", "=1", "=6", "=6"], "nobox"),
    "q7 robust truncated": ("7", ["=7", "=8", "=8", "=7"], "long"),
    "q8 tie": ("8", ["=8", "=1", "=2", "=3"], "ok"),
    "q9 fine": ("9", ["=9", "=10", "=9", "=9"], "ok"),
    "q10 fine": ("10", ["=10", "=0", "=0", "=10"], "ok"),
}


def make_run(tmp_path: Path, **over) -> tuple[SSBConfig, ScriptedEngine]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": q, "answer": f"#### {a}"}) + "\n"
                            for i, (q, (a, _, _)) in enumerate(PROBLEMS.items())))  # fmt: skip
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.source={data}", "rollout.k=4", "engine.batch_size=2"]
    cfg = load_config(None, overrides + [f"{k}={v}" for k, v in over.items()])
    engine = ScriptedEngine(
        {q: r for q, (_, r, _) in PROBLEMS.items()},
        {q: v for q, (_, _, v) in PROBLEMS.items()},
        {q: a for q, (a, _, _) in PROBLEMS.items()},
    )
    from ssb.rollout import load_stage_problems

    problems, report = load_stage_problems(cfg)
    run_rollouts(cfg, problems, RunLayout(cfg.run_dir), engine=engine, input_report=report)
    return cfg, engine


def read_outputs(run_dir: Path) -> dict[str, str]:
    return {n: (run_dir / "curate" / n).read_text() for n in ("teacher.jsonl", "student.jsonl", "curation_stats.json")}


def test_statuses_add_up_and_pairs_align(tmp_path):
    cfg, engine = make_run(tmp_path, **{"curate.target_pairs": 100})
    stats = run_curation(cfg, engine=engine)
    counts = stats["status_counts"]
    assert sum(counts.values()) == stats["problems"] == len(PROBLEMS)
    assert set(counts) == set(STATUSES)
    expected = {"no_correct": 2, "no_wrong": 2, "robust_wrong": 1, "no_boxed_answer": 1, "truncated": 1, "kept": 4}
    assert {k: v for k, v in counts.items() if v} == expected  # see PROBLEMS
    assert stats["stop_reason"] == "dataset_exhausted" and stats["pairs"] == 4
    teacher = [json.loads(x) for x in (Path(cfg.run_dir) / "curate/teacher.jsonl").read_text().splitlines()]
    student = [json.loads(x) for x in (Path(cfg.run_dir) / "curate/student.jsonl").read_text().splitlines()]
    assert [t["id"] for t in teacher] == [s["id"] for s in student] == ["p0", "p8", "p9", "p10"]
    for t, s in zip(teacher, student):
        assert (
            [m["role"] for m in t["messages"]] == [m["role"] for m in s["messages"]] == ["system", "user", "assistant"]
        )
        assert t["messages"][2] == s["messages"][2] and t["answer"] == s["answer"]
        question = s["messages"][1]["content"]
        assert question in t["messages"][1]["content"] and t["messages"][1]["content"] != question
        assert re.search(r"\\boxed\{" + re.escape(t["answer"]) + r"\}", t["messages"][2]["content"])


def test_no_mix_reasons_and_truncated_correct_is_never_a_hint():
    def roll(sample, answer, correct, finish="stop"):
        return {"id": "x", "sample": sample, "text": f"t{sample}", "answer": answer, "correct": correct,
                "finish_reason": finish}  # fmt: skip

    assert choose_pair("x", [roll(0, "3", False), roll(1, None, False)], 0)[0] == "no_correct"
    assert choose_pair("x", [roll(0, "3", True, "length"), roll(1, "4", False)], 0)[0] == "no_correct"
    assert (
        choose_pair("x", [roll(0, "3", True), roll(1, None, False), roll(2, "5", False, "length")], 0)[0] == "no_wrong"
    )
    status, choice = choose_pair("x", [roll(0, "3", True, "length"), roll(1, "3", True), roll(2, "4", False)], 0)
    assert status == "ok" and choice["correct_sample"] == 1 and choice["wrong_sample"] == 2


def test_most_common_wrong_answer_wins_and_ties_are_seeded():
    rolls = [{"id": "x", "sample": j, "text": f"t{j}", "answer": a, "correct": a == "0", "finish_reason": "stop"}
             for j, a in enumerate(["0", "1", "2", "2", "3", "3", "0"])]  # fmt: skip
    picks = {s: choose_pair("x", rolls, s)[1] for s in range(40)}
    assert all(c["wrong_answer"] in ("2", "3") and c["wrong_count"] == 2 for c in picks.values())
    assert all(c["tied_answers"] == ["2", "3"] for c in picks.values())
    assert {c["wrong_answer"] for c in picks.values()} == {"2", "3"}  # the seed really decides
    assert {c["correct_sample"] for c in picks.values()} == {0, 6}
    assert all(choose_pair("x", rolls, s)[1] == picks[s] for s in range(40))  # same seed, same pick
    rolls[1]["answer"] = rolls[2]["answer"] = "2"  # now "2" has three votes: no tie
    assert {choose_pair("x", rolls, s)[1]["wrong_answer"] for s in range(10)} == {"2"}


def test_judge_solution():
    assert judge_solution("x \\boxed{4}", "stop", "4") == "kept"
    assert judge_solution("x \\boxed{4}", "length", "4") == "truncated"
    assert judge_solution("x", "stop", "4") == "no_boxed_answer"
    assert judge_solution("\\boxed{5}", "stop", "4") == "robust_wrong"


def test_target_pairs_stop_early_and_say_so(tmp_path):
    cfg, engine = make_run(tmp_path, **{"curate.target_pairs": 2})
    stats = run_curation(cfg, engine=engine)
    assert stats["pairs"] == 2 and stats["stop_reason"] == "target_reached"
    assert sum(stats["status_counts"].values()) == len(PROBLEMS)
    assert stats["status_counts"]["not_reached"] == 2  # p9, p10 never generated
    assert stats["generated"] < stats["candidates"]


def test_resume_after_kill_gives_identical_files(tmp_path):
    cfg, engine = make_run(tmp_path / "a", **{"curate.target_pairs": 100})
    run_curation(cfg, engine=engine)
    reference = read_outputs(Path(cfg.run_dir))

    cfg, engine = make_run(tmp_path / "b", **{"curate.target_pairs": 100})

    def kill(batches_done: int) -> None:
        if batches_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_curation(cfg, engine=engine, on_batch=kill)
    decisions = (Path(cfg.run_dir) / "curate/decisions.jsonl").read_text()
    assert decisions.count("\n") == 4  # two batches of two candidates
    (Path(cfg.run_dir) / "curate/decisions.jsonl").write_text(decisions + '{"id": "p9", "sta')  # torn append
    engine.calls.clear()
    run_curation(cfg, engine=engine)
    assert engine.calls == [2, 1]  # only the unfinished candidates were generated again
    assert read_outputs(Path(cfg.run_dir)) == reference


def test_malformed_rollout_line_is_reported(tmp_path):
    cfg, _ = make_run(tmp_path)
    path = Path(cfg.run_dir) / "rollout/rollouts.jsonl"
    lines = path.read_text().splitlines()
    lines[5] = lines[5][:-3]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"rollouts.jsonl:6: invalid JSON"):
        read_rollouts(RunLayout(cfg.run_dir))
    bad = json.loads(lines[0])
    bad["correct"] = "yes"
    lines[5] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"rollouts.jsonl:6: field 'correct'"):
        read_rollouts(RunLayout(cfg.run_dir))


def test_attempts_keep_the_first_correct_robust_solution():
    """curate.attempts=N samples N robust solutions; the first correct one is kept, every verdict recorded."""
    from ssb.curate import generate_batch

    class Attempts:
        tokenizer = None

        def __init__(self, texts):
            self.texts = texts

        def generate(self, conversations, sampling, *, lora=None, seed_keys=None, desc="generate"):
            return [[Completion(t, (1,), "stop") for t in self.texts[: sampling.n]] for _ in conversations]

    problem = {"id": "p0", "question": "q", "answer": "4"}
    choice = {"correct_text": "\\boxed{4}", "wrong_text": "\\boxed{5}", "wrong_answer": "5"}
    texts = ["\\boxed{5}", "no box", "\\boxed{4} careful", "\\boxed{4} again"]
    for n, status, attempt in [(1, "robust_wrong", 0), (2, "robust_wrong", 0), (4, "kept", 2)]:
        sampling = Sampling(n=n, temperature=0.4, top_k=50, top_p=1.0, max_new_tokens=8, seed=0)
        (rec,) = generate_batch(Attempts(texts), [(problem, choice)], sampling, None)
        assert (rec["status"], rec["attempt"]) == (status, attempt)
        assert rec["attempt_statuses"] == [judge_solution(t, "stop", "4") for t in texts[:n]]
        assert rec["solution"] == texts[attempt]
