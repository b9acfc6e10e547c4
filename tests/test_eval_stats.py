"""Eval estimators against brute-force enumeration: pass@k, maj@k, sign test, bootstrap, aggregates."""

import itertools
import math

import numpy as np
import pytest

from ssb.eval.stats import (
    aggregate,
    bootstrap_ci,
    k_values,
    majority_correct,
    paired_test,
    pass_at_k,
    sign_test_p,
)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n):
    # brute force: the fraction of all size-k subsets of the n samples that hold at least one correct sample
    for c in range(n + 1):
        verdicts = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(verdicts, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable_and_pass1_is_the_mean():
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
    assert pass_at_k(1000, 999, 2) == 1.0
    assert 0.0 < pass_at_k(200, 3, 50) < 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(6) == [1, 2, 4, 6]


def _s(cluster, correct):
    return {"cluster": cluster, "correct": correct}


def test_majority_vote_rules():
    # answers: A(0, right) B(1, wrong) B B A -> B wins 3 to 2
    samples = [_s(0, True), _s(1, False), _s(1, False), _s(1, False), _s(0, True)]
    assert majority_correct(samples, 5) is False
    assert majority_correct(samples, 1) is True  # only the first sample votes
    # a 1-1 tie at k=2 goes to the answer seen first
    assert majority_correct(samples, 2) is True
    # samples without an answer do not vote; none at all is wrong
    assert majority_correct([_s(None, False), _s(None, False), _s(2, True)], 3) is True
    assert majority_correct([_s(None, False)], 1) is False


def test_sign_test_matches_binomial_enumeration():
    for wins, losses in [(0, 0), (0, 5), (3, 3), (7, 1), (2, 9)]:
        m = wins + losses
        # brute force: P(|X - m/2| >= |observed - m/2|) for X ~ Bin(m, 1/2)
        obs = abs(wins - m / 2)
        brute = sum(math.comb(m, x) for x in range(m + 1) if abs(x - m / 2) >= obs - 1e-12) / 2**m
        assert sign_test_p(wins, losses) == pytest.approx(min(1.0, brute)), (wins, losses)
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)


def test_bootstrap_ci_width_matches_normal_theory():
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.5).astype(float)
    lo, hi = bootstrap_ci(x, n_boot=2000, seed=0)
    assert lo < x.mean() < hi
    se = math.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci(np.ones(7)) == [1.0, 1.0]
    assert all(math.isnan(v) for v in bootstrap_ci(np.array([])))


def test_paired_test_directions():
    a = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0], dtype=float)
    same = paired_test(a, a)
    assert same["diff"] == 0 and same["p_sign"] == 1.0 and same["ties"] == a.size
    b = np.ones_like(a)  # B solves everything A missed
    better = paired_test(a, b)
    assert better["wins"] == 9 and better["losses"] == 0 and better["diff"] == pytest.approx(0.75)
    assert better["p_sign"] == pytest.approx(2 / 2**9) and better["p_bootstrap"] < 0.01
    assert better["diff_ci"][0] > 0
    with pytest.raises(ValueError):
        paired_test(a, b[:3])


def _rec(verdicts, level=None, tokens=10, finish="stop"):
    samples = [
        {"correct": v, "cluster": 0 if v else None, "pred": "1" if v else None, "n_tokens": tokens,
         "finish_reason": finish}
        for v in verdicts
    ]  # fmt: skip
    return {"id": str(id(samples)), "meta": {"level": level} if level else {}, "samples": samples}


def test_aggregate_metrics():
    records = [
        _rec([True, True, False, False], level=1, tokens=5),
        _rec([False, False, False, False], level=2, tokens=20, finish="length"),
        _rec([True, False, False, False], level=1, tokens=5),
    ]
    agg = aggregate(records, n_boot=200)
    assert agg["n_problems"] == 3 and agg["n_samples"] == 4
    assert agg["pass@k"]["1"]["value"] == pytest.approx((0.5 + 0 + 0.25) / 3)
    assert agg["pass@k"]["4"]["value"] == pytest.approx(2 / 3)
    lo, hi = agg["pass@k"]["1"]["ci"]
    assert lo <= agg["pass@k"]["1"]["value"] <= hi
    assert agg["by_level"]["1"] == {"n_problems": 2, "pass@1": pytest.approx(0.375)}
    assert agg["by_level"]["2"]["pass@1"] == 0.0
    records[0]["meta"]["traps"], records[1]["meta"]["traps"] = ["each", "gives"], []
    by_traps = aggregate(records, n_boot=10)["by_traps"]
    assert by_traps == {"each+gives": {"n_problems": 1, "pass@1": 0.5}, "none": {"n_problems": 1, "pass@1": 0.0}}
    assert agg["truncation_rate"] == pytest.approx(4 / 12)
    assert agg["mean_tokens_correct"] == 5 and agg["mean_tokens_wrong"] == pytest.approx((4 * 20 + 5 * 5) / 9)
    assert agg["no_answer_rate"] == pytest.approx(9 / 12)
    with pytest.raises(ValueError):
        aggregate([_rec([True]), _rec([True, False])])
