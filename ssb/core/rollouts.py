"""Reading a finished rollout stage (``RUN_DIR/rollout``): the problems and their graded samples, validated.

Shared by the stages that select what to distil from the rollouts (``ssb.curate``, ``ssb.onpolicy``), and the one
record format of a graded bare sample (:func:`grade_sample`: ``ssb rollout`` and ``ssb curate --compare-templates``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ssb.core.files import InputError, iter_jsonl
from ssb.core.grading import cluster_answers, grade
from ssb.core.layout import RunLayout

if TYPE_CHECKING:
    from ssb.engines import Completion


def grade_sample(problem_id: str, sample: int, gold: str, completion: Completion, mode: str = "strict") -> dict:
    """One rollouts.jsonl record. A truncated sample is never correct, whatever its text says."""
    verdict = grade(completion.text, gold, finish_reason=completion.finish_reason, mode=mode)
    return {
        "id": problem_id,
        "sample": sample,
        "text": completion.text,
        "answer": verdict.answer,
        "gold": gold,
        "correct": verdict.correct,
        "finish_reason": completion.finish_reason,
        "num_tokens": completion.num_tokens,
    }


_ROLLOUT_FIELDS = {"id": str, "sample": int, "text": str, "correct": bool, "finish_reason": str}


def read_rollouts(layout: RunLayout) -> tuple[list[dict], dict[str, list[dict]]]:
    """Problems (in order) and their rollouts, validated: errors name the file, line and field."""
    for path in (layout.problems, layout.rollouts, layout.rollout_stats):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; run `ssb rollout` (to completion) first")
    problems = []
    for line, rec in iter_jsonl(layout.problems):
        for key in ("id", "question", "answer"):
            if not isinstance(rec.get(key), str):
                raise InputError(f"{layout.problems}:{line}: field {key!r} must be a string")
        problems.append(rec)
    by_id: dict[str, list[dict]] = {p["id"]: [] for p in problems}
    path = layout.rollouts
    for line, rec in iter_jsonl(path):
        for key, tp in _ROLLOUT_FIELDS.items():
            if not isinstance(rec.get(key), tp):
                raise InputError(f"{path}:{line}: field {key!r} must be {tp.__name__}")
        if rec["id"] not in by_id:
            raise InputError(f"{path}:{line}: id {rec['id']!r} is not in {layout.problems.name}")
        if rec.get("answer") is not None and not isinstance(rec["answer"], str):
            raise InputError(f"{path}:{line}: field 'answer' must be a string or null")
        by_id[rec["id"]].append(rec)
    return problems, by_id


def wrong_answer_groups(done: list[dict]) -> list[list[dict]]:
    """The wrong rollouts of ``done`` that have an answer, grouped by equivalent answer
    (:func:`ssb.core.grading.cluster_answers`), groups and members in order of first appearance."""
    wrong = [r for r in done if not r["correct"] and r.get("answer") is not None]
    groups: dict[int, list[dict]] = {}
    for r, c in zip(wrong, cluster_answers([r["answer"] for r in wrong]), strict=True):
        groups.setdefault(c, []).append(r)
    return list(groups.values())
