"""The verdict on one hinted sample: is it an honest robust solution, and if not, why not.

Kept only when it stops by itself (a cut reply is never kept), has a boxed answer that :func:`ssb.core.grading.grade`
finds correct, does not give away that it was written from the hinted view (the template's phrases,
:func:`ssb.core.prompts.leaked_phrase`), and does not loop (one word n-gram repeated more than ``repeat_max`` times).
The SSB reference keeps any reply whose boxed answer is correct; the last two checks are ours.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ssb.core.grading import grade
from ssb.core.prompts import DEFAULT_PROMPTS, PromptSet, leaked_phrase, template

# Every hinted sample ends in one of these, checked in this order (the first that applies names it).
VERDICTS = ("kept", "truncated", "no_boxed_answer", "robust_wrong", "leaks_hint", "repeats")
RIGHT_ANSWER = ("kept", "leaks_hint", "repeats")  # the boxed answer was correct (the premise report's accuracy)


def repeated_ngram(text: str, n: int, max_count: int) -> str | None:
    """The first word n-gram of ``text`` that occurs more than ``max_count`` times, or None (``n <= 0``: None)."""
    words = text.split()
    if n <= 0 or len(words) < n:
        return None
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    return " ".join(gram) if count > max_count else None


@dataclass(frozen=True)
class Judge:
    """How hinted samples are judged: grading mode, the template (for its leak phrases) and the repetition rule."""

    mode: str = "strict"
    prompts: PromptSet = DEFAULT_PROMPTS
    repeat_ngram: int = 8
    repeat_max: int = 2

    @classmethod
    def from_config(cls, cfg, template_name: str | None = None) -> Judge:
        """From ``cfg.grading`` and ``cfg.curate`` (``template_name`` overrides ``curate.template``)."""
        c = cfg.curate
        return cls(cfg.grading.mode, template(template_name or c.template), c.repeat_ngram, c.repeat_max)

    def __call__(self, text: str, finish_reason: str, gold: str) -> str:
        """One of :data:`VERDICTS`."""
        verdict = grade(text, gold, finish_reason=finish_reason, mode=self.mode)
        if verdict.status == "truncated":
            return "truncated"
        if verdict.answer is None:
            return "no_boxed_answer"
        if not verdict.correct:
            return "robust_wrong"
        if leaked_phrase(text, self.prompts) is not None:
            return "leaks_hint"
        if repeated_ngram(text, self.repeat_ngram, self.repeat_max) is not None:
            return "repeats"
        return "kept"


DEFAULT_JUDGE = Judge()


def judge_solution(text: str, finish_reason: str, gold: str, mode: str = "strict") -> str:
    """Verdict on a robust solution under the default judge (the paper's template): one of :data:`VERDICTS`."""
    return Judge(mode=mode)(text, finish_reason, gold)


def rejections(decisions: list[dict]) -> dict[str, int]:
    """Every hinted sample that was not kept, counted by reason (a candidate whose prompt was too long: one)."""
    counts = {v: 0 for v in (*VERDICTS[1:], "prompt_too_long")}
    for d in decisions:
        for s in d.get("attempt_statuses", [d.get("status")]):
            if s in counts:
                counts[s] += 1
    return counts
