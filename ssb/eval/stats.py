"""Estimators for ``ssb eval``: unbiased pass@k, maj@k, bootstrap CIs over problems, paired significance tests.

Everything here is pure numpy/python on per-problem records, so it is exact, fast and testable without a model.
A per-problem record is ``{"id", "answer", "meta", "samples": [{"correct": bool, "cluster": int | None,
"n_tokens": int, "finish_reason": str, "pred": str | None, ...}]}`` (see :mod:`ssb.eval.scoring`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ssb.core.files import InputError
from ssb.core.stats import CI_LEVEL, bootstrap_ci  # defined one floor down (curate uses it too); re-exported


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    The estimator of Chen et al. 2021 (https://arxiv.org/abs/2107.03374, eq. 1 and its numerically stable
    product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``): the probability that a random size-k subset of the
    n samples holds at least one correct one.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def k_values(n: int) -> list[int]:
    """The k reported for n samples: powers of two below n, and n itself (1, 2, 4, ..., n)."""
    ks = [1 << i for i in range(max(n, 1).bit_length()) if (1 << i) < n]
    return ks + [n]


def majority_correct(samples: Sequence[dict], k: int) -> bool:
    """maj@k on the first ``k`` samples: the most frequent answer cluster wins (ties: earliest first seen).

    ``cluster`` is the index of the first sample with an equivalent extracted answer (assigned by the grader,
    so ``1/2`` and ``0.5`` vote together); samples without an answer (``cluster is None``) do not vote, and a
    problem with no answer at all counts as wrong. The winner's verdict is its first sample's verdict.
    """
    votes = Counter(s["cluster"] for s in samples[:k] if s.get("cluster") is not None)
    if not votes:
        return False
    best = max(votes.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    return bool(samples[best]["correct"])


def per_problem(records: Sequence[dict], k: int, metric: str) -> np.ndarray:
    """Per-problem values of ``metric`` ("pass" = unbiased pass@k, "maj" = maj@k). Shape: (P,) float64."""
    out = np.empty(len(records), dtype=np.float64)
    for i, rec in enumerate(records):
        samples = rec["samples"]
        if metric == "pass":
            out[i] = pass_at_k(len(samples), sum(bool(s["correct"]) for s in samples), k)
        elif metric == "maj":
            out[i] = float(majority_correct(samples, k))
        else:
            raise ValueError(f"unknown metric {metric!r} (expected 'pass' or 'maj')")
    return out


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a Binomial(wins+losses, 1/2) split at least this lopsided). Ties dropped.

    With one sample per problem this is the exact McNemar test on the discordant pairs.
    """
    m = wins + losses
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(wins, losses) + 1)) / 2**m
    return min(1.0, 2.0 * tail)


def paired_test(a: np.ndarray, b: np.ndarray, *, n_boot: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of per-problem pass rates ``a`` and ``b`` on the same problems. Shape: (P,), (P,).

    Two views, both on the per-problem difference ``d = b - a``:
    - paired bootstrap: resample problems (keeping pairs), 95% CI of mean(d) and a two-sided p-value
      ``2 * min(P*(mean d <= 0), P*(mean d >= 0))``: accounts for problem difficulty shared by both runs;
    - exact sign test on problems where the runs differ (b better = win): no distributional assumption;
      equals the exact McNemar test when each run has one sample per problem.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_test: a and b must be aligned per problem, got shapes {a.shape} and {b.shape}")
    d = b - a
    out: dict = {"n_problems": int(d.size), "mean_a": float(a.mean()) if d.size else math.nan}
    out["mean_b"] = float(b.mean()) if d.size else math.nan
    out["diff"] = float(d.mean()) if d.size else math.nan
    if d.size:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)  # (B,)
        lo, hi = np.quantile(means, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
        # (count + 1) / (B + 1): a p-value never reported as exactly 0 from finitely many resamples
        p_boot = min(1.0, (2 * min(int((means <= 0).sum()), int((means >= 0).sum())) + 1) / (n_boot + 1))
        out.update(diff_ci=[float(lo), float(hi)], p_bootstrap=p_boot)
    else:
        out.update(diff_ci=[math.nan, math.nan], p_bootstrap=1.0)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    out.update(wins=wins, losses=losses, ties=int(d.size - wins - losses), p_sign=sign_test_p(wins, losses))
    return out


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def group_accuracy(records: Sequence[dict], key: str) -> dict[str, dict]:
    """pass@1 per value of ``meta[key]`` (MATH "level"/"subject", toy "traps"); problems without the key skip it.

    A list value (the toy world's trap wordings) is one group named by its items joined with "+" ("none" if empty).
    """
    groups: dict[str, list[float]] = {}
    for rec in records:
        value = (rec.get("meta") or {}).get(key)
        if value is None:
            continue
        if isinstance(value, list):
            value = "+".join(map(str, value)) or "none"
        samples = rec["samples"]
        groups.setdefault(str(value), []).append(sum(bool(s["correct"]) for s in samples) / len(samples))
    return {g: {"n_problems": len(v), "pass@1": float(np.mean(v))} for g, v in sorted(groups.items())}


def aggregate(records: Sequence[dict], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric of one benchmark run, with 95% bootstrap CIs over problems.

    Returns ``{"n_problems", "n_samples", "pass@k": {k: {"value", "ci"}}, "maj@k": {...}, "pass@1_by_mode":
    {mode: {"value", "ci"}} (strict and flexible side by side), "by_level", "by_subject", "mean_tokens_correct",
    "mean_tokens_wrong", "truncation_rate", "truncated_right_answer_rate", "no_answer_rate"}``.
    """
    if not records:
        return {"n_problems": 0, "n_samples": 0}
    n_samples = {len(r["samples"]) for r in records}
    if len(n_samples) != 1 or 0 in n_samples:
        raise ValueError(f"aggregate: every problem needs the same positive number of samples, got {n_samples}")
    n = n_samples.pop()
    out: dict = {"n_problems": len(records), "n_samples": n}
    for name, metric in (("pass@k", "pass"), ("maj@k", "maj")):
        out[name] = {}
        for k in k_values(n):
            vals = per_problem(records, k, metric)
            out[name][str(k)] = {"value": float(vals.mean()), "ci": bootstrap_ci(vals, n_boot=n_boot, seed=seed)}
    modes = [m for m in records[0]["samples"][0].get("by_mode", {})]  # results written before by_mode have none
    out["pass@1_by_mode"] = {}
    for m in modes:
        vals = np.array([np.mean([s["by_mode"][m] for s in r["samples"]]) for r in records], dtype=np.float64)
        out["pass@1_by_mode"][m] = {"value": float(vals.mean()), "ci": bootstrap_ci(vals, n_boot=n_boot, seed=seed)}
    out["by_level"] = group_accuracy(records, "level")
    out["by_subject"] = group_accuracy(records, "subject")
    out["by_traps"] = group_accuracy(records, "traps")
    flat = [s for r in records for s in r["samples"]]
    out["mean_tokens_correct"] = _mean([s["n_tokens"] for s in flat if s["correct"]])
    out["mean_tokens_wrong"] = _mean([s["n_tokens"] for s in flat if not s["correct"]])
    out["truncation_rate"] = float(np.mean([s["finish_reason"] == "length" for s in flat]))
    # the protocol counts a truncated reply as wrong; this is the share of samples that rule turned from right
    out["truncated_right_answer_rate"] = float(
        np.mean([s["finish_reason"] == "length" and bool(s.get("answer_correct")) for s in flat])
    )
    out["no_answer_rate"] = float(np.mean([s.get("pred") is None for s in flat]))
    return out


# Comparing two results files (the dicts written by ssb.eval.scoring)


def results_path(path: str | Path) -> Path:
    """The ``results.json`` that ``path`` names: the file; a directory holding one (``RUN/eval/<label>``); an eval
    output directory (``RUN/eval``) or a run directory (``RUN``), where it is the trained model's: the one label
    other than ``base`` (the latest ``round<r>`` with rounds), or ``base`` when that is all there is."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise InputError(f"{p}: no such file or directory (expected a results.json, or an eval or run directory)")
    if (p / "results.json").is_file():
        return p / "results.json"
    evals = p / "eval" if (p / "eval").is_dir() else p
    labels = sorted(d.name for d in evals.iterdir() if (d / "results.json").is_file())
    trained = [lb for lb in labels if lb != "base"]
    rounds = sorted((int(lb[5:]), lb) for lb in trained if lb[5:].isdigit() and lb.startswith("round"))
    if rounds and len(rounds) == len(trained):
        trained = [rounds[-1][1]]
    if not labels:
        raise InputError(
            f"{p}: holds no eval results (no results.json in it, in eval/<label>/ or <label>/); run ssb eval first"
        )
    if len(trained) > 1:
        raise InputError(f"{p}: holds results of {', '.join(labels)}; name one as {evals}/<label>")
    return evals / (trained or labels)[0] / "results.json"


def load_results(path: str | Path) -> dict:
    """A ``results.json`` (or a directory :func:`results_path` resolves), checked for the fields reports need."""
    path = results_path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read eval results: {e}") from None
    if not isinstance(results, dict):
        raise InputError(f"{path}: not an ssb eval results file (a {type(results).__name__}, not an object)")
    for key in ("label", "protocol", "benchmarks"):
        if key not in results:
            raise InputError(f"{path}: not an ssb eval results file (missing field {key!r})")
    return results


def compare(results_a: dict | str | Path, results_b: dict | str | Path, *, n_boot: int = 10000, seed: int = 0) -> dict:
    """Paired test of B against A per shared benchmark, on per-problem pass rates (mean verdict over n samples).

    Problems are matched by id; problems only one run has are counted in ``unmatched`` and left out.
    ``same_protocol`` is False when the two runs used different protocols (then the difference mixes model
    and protocol). See :func:`ssb.eval.stats.paired_test` for the two tests.
    """
    a = results_a if isinstance(results_a, dict) else load_results(results_a)
    b = results_b if isinstance(results_b, dict) else load_results(results_b)
    out: dict = {
        "label_a": a["label"],
        "label_b": b["label"],
        "same_protocol": a["protocol"] == b["protocol"],
        "benchmarks": {},
    }
    for bench in [x for x in a["benchmarks"] if x in b["benchmarks"]]:
        rate = {
            side: {r["id"]: np.mean([s["correct"] for s in r["samples"]]) for r in res["benchmarks"][bench]["problems"]}
            for side, res in (("a", a), ("b", b))
        }
        ids = [i for i in rate["a"] if i in rate["b"]]
        test = paired_test(
            np.array([rate["a"][i] for i in ids]), np.array([rate["b"][i] for i in ids]), n_boot=n_boot, seed=seed
        )
        test["unmatched"] = len(rate["a"]) + len(rate["b"]) - 2 * len(ids)
        out["benchmarks"][bench] = test
    return out
