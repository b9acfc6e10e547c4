"""Reports for ``ssb eval``: markdown tables of one or more runs and a PNG bar chart with 95% CI error bars.

Input is the ``results.json`` dict written by :func:`ssb.eval.scoring.evaluate` (``{"label", "protocol",
"benchmarks": {name: {"aggregates": ..., "problems": [...]}}}``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ssb.core.files import atomic_write_text
from ssb.eval.stats import compare


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(entry: dict) -> str:
    lo, hi = entry["ci"]
    return f"{_pct(entry['value'])} [{_pct(lo)}, {_pct(hi)}]"


def _tokens(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _by_mode(agg: dict) -> str:
    """pass@1 under the strict and the flexible grading mode, whatever mode the protocol graded in."""
    modes = agg.get("pass@1_by_mode") or {}
    return " / ".join(_pct(modes[m]["value"]) for m in ("strict", "flexible") if m in modes) or "-"


def markdown_table(runs: Sequence[dict]) -> str:
    """One row per (run, benchmark): pass@1 with 95% CI, pass@n, maj@n, lengths, truncation (percentages)."""
    lines = [
        "| run | benchmark | protocol | problems | n | pass@1 [95% CI] | strict / flexible | pass@n | maj@n | "
        "tokens (correct / wrong) | truncated | no answer |",
        "|---|---|---|---:|---:|---|---|---:|---:|---|---:|---:|",
    ]
    for run in runs:
        for bench, res in run["benchmarks"].items():
            agg = res["aggregates"]
            if not agg.get("n_problems"):
                lines.append(
                    f"| {run['label']} | {bench} | {run['protocol']['name']} | 0 | - | - | - | - | - | - | - | - |"
                )
                continue
            n = str(agg["n_samples"])
            lines.append(
                f"| {run['label']} | {bench} | {run['protocol']['name']} | {agg['n_problems']} | {n} | "
                f"{_ci(agg['pass@k']['1'])} | {_by_mode(agg)} | {_pct(agg['pass@k'][n]['value'])} | "
                f"{_pct(agg['maj@k'][n]['value'])} | "
                f"{_tokens(agg['mean_tokens_correct'])} / {_tokens(agg['mean_tokens_wrong'])} | "
                f"{_pct(agg['truncation_rate'])} | {_pct(agg['no_answer_rate'])} |"
            )
    return "\n".join(lines) + "\n"


def group_table(runs: Sequence[dict], key: str = "by_level") -> str:
    """pass@1 per MATH level (``key="by_level"``) or subject (``"by_subject"``), one column per run; "" if none."""
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for run in runs:
        for bench, res in run["benchmarks"].items():
            for group, g in res["aggregates"].get(key, {}).items():
                rows.setdefault((bench, group), {})[run["label"]] = f"{_pct(g['pass@1'])} (n={g['n_problems']})"
    if not rows:
        return ""
    labels = [run["label"] for run in runs]
    title = key.removeprefix("by_")
    lines = [f"| benchmark | {title} | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for (bench, group), cells in sorted(rows.items()):
        lines.append(f"| {bench} | {group} | " + " | ".join(cells.get(lb, "-") for lb in labels) + " |")
    return "\n".join(lines) + "\n"


def compare_table(comparison: dict) -> str:
    """Markdown table of :func:`ssb.eval.compare`: per benchmark, A vs B, the difference and both p-values."""
    a, b = comparison["label_a"], comparison["label_b"]
    lines = [
        f"| benchmark | problems | {a} pass@1 | {b} pass@1 | diff (B-A) [95% CI] | B wins / losses / ties | "
        "p (paired bootstrap) | p (sign test) |",
        "|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for bench, t in comparison["benchmarks"].items():
        lo, hi = t["diff_ci"]
        lines.append(
            f"| {bench} | {t['n_problems']} | {_pct(t['mean_a'])} | {_pct(t['mean_b'])} | "
            f"{100 * t['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {t['wins']} / {t['losses']} / {t['ties']} | "
            f"{t['p_bootstrap']:.3g} | {t['p_sign']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def chart_figure(runs: Sequence[dict], *, metric: str = "pass@k", k: str = "1"):
    """The grouped bar chart as a matplotlib figure: one group per benchmark, one bar per run, 95% bootstrap CI as
    error bars, each bar's value above it; the legend sits in its own row under the axes, so it never covers a bar,
    a value or a label, however many runs."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in workers and CI
    import matplotlib.pyplot as plt
    import numpy as np

    benches: list[str] = []
    for run in runs:
        benches += [b for b in run["benchmarks"] if b not in benches]
    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(benches))
    size = (max(4.0, 1.6 * len(benches) * max(len(runs), 1) ** 0.5 + 2), 3.9)
    fig, ax = plt.subplots(figsize=size, dpi=120, layout="constrained")
    for i, run in enumerate(runs):
        vals, err_lo, err_hi = [], [], []
        for bench in benches:
            entry = run["benchmarks"].get(bench, {}).get("aggregates", {}).get(metric, {}).get(k)
            v, (lo, hi) = (entry["value"], entry["ci"]) if entry else (np.nan, (np.nan, np.nan))
            vals.append(100 * v)
            err_lo.append(100 * (v - lo))
            err_hi.append(100 * (hi - v))
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, vals, width, yerr=[err_lo, err_hi], capsize=3, label=run["label"])
        for xp, v, e in zip(pos, vals, err_hi):
            if v == v:  # value above its error bar, readable for small and large bars alike
                ax.text(xp, v + e + 1.5, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, benches)
    ax.set_ylabel(f"{metric.replace('@k', '@' + k)} (%)")
    ax.set_ylim(0, 112)  # room for a value label above a 100% bar and its error bar
    protocols = sorted({run["protocol"]["name"] for run in runs})
    ax.set_title(f"protocol: {', '.join(protocols)}; error bars: 95% bootstrap CI over problems", fontsize=8)
    # "outside": constrained layout reserves the legend's own row below the axes and tick labels.
    fig.legend(loc="outside lower center", ncol=min(len(runs), 3) or 1, fontsize=8, frameon=False)
    return fig


def plot_runs(runs: Sequence[dict], path: str | Path, *, metric: str = "pass@k", k: str = "1") -> Path:
    """:func:`chart_figure` written to ``path`` as a PNG (atomically: a reader never sees half a PNG)."""
    import matplotlib.pyplot as plt

    fig = chart_figure(runs, metric=metric, k=k)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(runs: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """``OUT/report.md`` (tables for all runs, paired test of each run against the first) and ``OUT/chart.png``."""
    out_dir = Path(out_dir)
    parts = ["## Results (percent; 95% bootstrap CI over problems)\n", markdown_table(runs)]
    for key in ("by_level", "by_subject", "by_traps"):
        table = group_table(runs, key)
        if table:
            parts += [f"\n### pass@1 {key.replace('_', ' ')}\n", table]
    for other in runs[1:]:
        cmp = compare(runs[0], other)
        parts += [f"\n## {other['label']} vs {runs[0]['label']} (paired, per problem)\n", compare_table(cmp)]
        if not cmp["same_protocol"]:
            parts.append("\nWarning: the two runs used different protocols.\n")
    report = out_dir / "report.md"
    atomic_write_text(report, "".join(parts))
    return report, plot_runs(runs, out_dir / "chart.png")


def print_compare(a: dict, b: dict) -> dict:
    cmp = compare(a, b)
    print(markdown_table([a, b]))
    print(compare_table(cmp))
    if not cmp["same_protocol"]:
        print("Warning: the two runs used different protocols; the difference mixes model and protocol.")
    print(
        "Tests on per-problem pass rates d = B - A: paired bootstrap over problems (CI of mean d, two-sided p) "
        "and the exact sign test on problems where A and B differ (= exact McNemar with one sample per problem)."
    )
    return cmp
