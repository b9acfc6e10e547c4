"""Eval reports: results files round-trip, the markdown tables, the paired comparison and the PNG chart."""

import json

import numpy as np
import pytest

from ssb.core.files import atomic_write_json
from ssb.eval.report import compare_table, group_table, markdown_table, plot_runs, write_report
from ssb.eval.stats import aggregate, compare, load_results


def _run(label, rates, seed, n=2, protocol="qwen-math"):
    """Synthetic results: problem i is solved by each of n samples with probability rates[i]."""
    rng = np.random.default_rng(seed)
    problems = []
    for i, rate in enumerate(rates):
        samples = []
        for _ in range(n):
            ok = bool(rng.random() < rate)
            samples.append({"text": f"\\boxed{{{i if ok else -1}}}", "pred": str(i if ok else -1), "correct": ok,
                            "cluster": 0, "n_tokens": 12 if ok else 30, "finish_reason": "stop"})  # fmt: skip
        problems.append({"id": f"p{i}", "question": f"q{i}", "answer": str(i), "meta": {"level": 1 + i % 3},
                         "samples": samples})  # fmt: skip
    bench = {"aggregates": aggregate(problems, n_boot=200), "problems": problems}
    return {"version": 1, "label": label, "protocol": {"name": protocol}, "benchmarks": {"toy": bench}}


def test_results_round_trip(tmp_path):
    run = _run("base", [0.5] * 10, seed=0)
    atomic_write_json(tmp_path / "results.json", run)
    assert load_results(tmp_path) == run  # a directory or the file itself
    assert load_results(tmp_path / "results.json") == run
    (tmp_path / "bad.json").write_text(json.dumps({"label": "x"}))
    with pytest.raises(ValueError, match="missing field 'protocol'"):
        load_results(tmp_path / "bad.json")


def test_tables_and_paired_comparison():
    base = _run("base", [0.2] * 40, seed=1)
    better = _run("ssb", [0.9] * 40, seed=2)
    table = markdown_table([base, better])
    rows = [line for line in table.splitlines() if line.startswith("| base") or line.startswith("| ssb")]
    assert len(rows) == 2 and "toy" in rows[0]
    assert "level" in group_table([base, better], "by_level") and group_table([base], "by_subject") == ""
    cmp = compare(base, better)
    t = cmp["benchmarks"]["toy"]
    assert cmp["same_protocol"] and t["n_problems"] == 40 and t["unmatched"] == 0
    assert t["diff"] > 0.4 and t["p_sign"] < 1e-3 and t["p_bootstrap"] < 1e-3
    assert "| toy | 40 |" in compare_table(cmp)
    # a run against itself: no difference, nothing significant
    t_same = compare(base, base)["benchmarks"]["toy"]
    assert t_same["diff"] == 0 and t_same["p_sign"] == 1.0
    # different protocols are flagged, missing problems are counted
    other = _run("r1", [0.5] * 30, seed=3, protocol="r1")
    cmp2 = compare(base, other)
    assert not cmp2["same_protocol"] and cmp2["benchmarks"]["toy"]["unmatched"] == 10


def test_chart_is_a_real_png(tmp_path):
    import matplotlib.image

    runs = [_run("base", [0.3] * 20, seed=4), _run("ssb", [0.6] * 20, seed=5)]
    report, chart = write_report(runs, tmp_path)
    assert chart.exists() and chart.stat().st_size > 5000
    img = matplotlib.image.imread(chart)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not a blank canvas
    text = report.read_text()
    assert "ssb vs base" in text and "p (sign test)" in text
    # a second call with three runs and a missing benchmark still draws
    empty = {"label": "empty", "protocol": {"name": "qwen-math"}, "benchmarks": {}}
    assert plot_runs(runs + [empty], tmp_path / "three.png").stat().st_size > 5000
