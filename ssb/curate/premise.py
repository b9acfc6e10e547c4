"""SSB's premise, measured: is the hinted view (a correct and a wrong attempt shown) a better policy than the bare
model on the same problems?

On every problem the hinted teacher was asked (its prompt fitted), per attempt: the bare model's accuracy and cut
(truncated) share over that problem's K rollouts, against the hinted samples'. Each side has the same number of
attempts per problem (``rollout.k``, ``curate.attempts``), so the per-attempt rate is the mean of per-problem rates
and its 95% CI is the bootstrap over problems (:func:`ssb.core.stats.bootstrap_ci`); the differences are paired by
problem. The hinted view is *better* when its accuracy is above the bare model's and its cut share is not above the
bare one by more than the CI (the paired difference's CI lies above 0); ``ssb run`` stops after curate otherwise,
unless ``curate.require_better_teacher=false``.
"""

from __future__ import annotations

import numpy as np

from ssb.core.stats import bootstrap_ci
from ssb.curate.judge import RIGHT_ANSWER

VERDICT_TEXT = {
    "better": "hinted view better",
    "not_more_accurate": "hinted view NOT better: not more accurate than the bare model",
    "truncates_more": "hinted view NOT better: cut more often than the bare model (beyond the 95% CI)",
    "no_attempts": "not measured: no hinted sample was generated",
}


def _side(correct: list[int], truncated: list[int], attempts: list[int], n_boot: int, seed: int) -> dict:
    n = np.asarray(attempts, dtype=np.float64)
    acc, cut = np.asarray(correct) / n, np.asarray(truncated) / n
    return {
        "correct": int(sum(correct)),
        "attempts": int(sum(attempts)),
        "truncated": int(sum(truncated)),
        "accuracy": {"value": float(acc.mean()), "ci": bootstrap_ci(acc, n_boot=n_boot, seed=seed)},
        "truncation": {"value": float(cut.mean()), "ci": bootstrap_ci(cut, n_boot=n_boot, seed=seed)},
    }


def premise_report(
    decisions: list[dict], rollouts: dict[str, list[dict]], *, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Bare vs hinted on the problems of ``decisions`` that were generated (curate's decision records, with
    ``attempt_statuses``); ``rollouts``: problem id -> its graded rollouts (rollouts.jsonl records)."""
    asked = [d for d in decisions if d.get("status") != "prompt_too_long"]
    if not asked:
        empty = {"problems": 0, "verdict": "no_attempts"}
        return {**empty, "line": premise_line(empty)}
    bare = {"correct": [], "truncated": [], "attempts": []}
    hinted = {"correct": [], "truncated": [], "attempts": []}
    for d in asked:
        rolls = rollouts[d["id"]]
        bare["correct"].append(sum(bool(r["correct"]) for r in rolls))
        bare["truncated"].append(sum(r["finish_reason"] == "length" for r in rolls))
        bare["attempts"].append(len(rolls))
        statuses = d.get("attempt_statuses", [d["status"]])
        hinted["correct"].append(sum(s in RIGHT_ANSWER for s in statuses))
        hinted["truncated"].append(sum(s == "truncated" for s in statuses))
        hinted["attempts"].append(len(statuses))
    out = {"problems": len(asked), "bare": _side(**bare, n_boot=n_boot, seed=seed)}
    out["hinted"] = _side(**hinted, n_boot=n_boot, seed=seed)
    for key, num in (("accuracy_diff", "correct"), ("truncation_diff", "truncated")):
        d = np.asarray(hinted[num]) / np.asarray(hinted["attempts"]) - np.asarray(bare[num]) / np.asarray(
            bare["attempts"]
        )  # (P,) per-problem hinted - bare
        out[key] = {"value": float(d.mean()), "ci": bootstrap_ci(d, n_boot=n_boot, seed=seed)}
    out["verdict"] = verdict(out)
    out["line"] = premise_line(out)
    return out


def verdict(report: dict) -> str:
    """better | not_more_accurate | truncates_more | no_attempts (see the module docstring)."""
    if not report.get("problems"):
        return "no_attempts"
    if report["hinted"]["accuracy"]["value"] <= report["bare"]["accuracy"]["value"]:
        return "not_more_accurate"
    if report["truncation_diff"]["ci"][0] > 0:
        return "truncates_more"
    return "better"


def is_better(report: dict | None) -> bool:
    """False only when the premise was measured and failed (a report without attempts says nothing)."""
    return report is None or report["verdict"] in ("better", "no_attempts")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def premise_line(report: dict) -> str:
    """One line: bare vs hinted accuracy and cut share per attempt, with 95% CIs, and the verdict."""
    if not report.get("problems"):
        return f"premise: {VERDICT_TEXT['no_attempts']}"

    def side(s: dict) -> str:
        lo, hi = s["accuracy"]["ci"]
        return f"{_pct(s['accuracy']['value'])} correct [{_pct(lo)}, {_pct(hi)}], {_pct(s['truncation']['value'])} cut"

    return (
        f"premise on {report['problems']} problems, per attempt: bare {side(report['bare'])} "
        f"(n={report['bare']['attempts']}); hinted {side(report['hinted'])} (n={report['hinted']['attempts']}) "
        f"-> {VERDICT_TEXT[report['verdict']]}"
    )
