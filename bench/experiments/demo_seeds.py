"""Collect ``ssb demo`` runs of several seeds into one table: per seed, the premise line, the pairs, and base / SSB /
SFT / RFT pass@1 under flexible and strict grading with 95% CIs and the paired difference of each student to base.

    python bench/experiments/demo_seeds.py OUT.json RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a finished demo (``report.json``, ``eval/<label>/results.json``); a run that has not reached its
report is listed as missing, never skipped silently. Writes OUT.json and prints the markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = ("base", "ssb", "sft", "rft")


def _pct(x: dict) -> str:
    lo, hi = x["ci"]
    return f"{100 * x['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def collect(run: Path) -> dict:
    from ssb.eval.stats import compare, load_results

    report = json.loads((run / "report.json").read_text())
    res = {k: load_results(run / "eval" / k / "results.json") for k in LABELS}
    bench = report["benchmark"]
    out = {"run": str(run), "seed": report["seed"], "pairs": report["pairs"], "premise": report["premise"]["line"]}
    for k in LABELS:
        agg = res[k]["benchmarks"][bench]["aggregates"]
        out[k] = {
            "flexible": agg["pass@1_by_mode"]["flexible"],
            "strict": agg["pass@1_by_mode"]["strict"],
            "truncation_rate": agg["truncation_rate"],
        }
        if k != "base":
            t = compare(res["base"], res[k])["benchmarks"][bench]
            out[k]["vs_base"] = {"diff": t["diff"], "ci": t["diff_ci"]}
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| seed | pairs | model | flexible pass@1 [95% CI] | strict | cut | vs base (95% CI) |",
        "|---|---:|---|---|---|---:|---|",
    ]
    for r in rows:
        for k in LABELS:
            m = r[k]
            vs = m.get("vs_base")
            diff = f"{100 * vs['diff']:+.1f} ({100 * vs['ci'][0]:+.1f}, {100 * vs['ci'][1]:+.1f})" if vs else ""
            lines.append(
                f"| {r['seed']} | {r['pairs']} | {k} | {_pct(m['flexible'])} | {_pct(m['strict'])} | "
                f"{100 * m['truncation_rate']:.0f}% | {diff} |"
            )
    return "\n".join(lines)


def main() -> None:
    out, runs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    done = [r for r in runs if (r / "report.json").is_file()]
    missing = [str(r) for r in runs if r not in done]
    rows = [collect(r) for r in done]
    for r in rows:
        print(f"seed {r['seed']}: {r['premise']}")
    means = {k: sum(r[k]["flexible"]["value"] for r in rows) / len(rows) for k in LABELS} if rows else {}
    out.write_text(json.dumps({"seeds": rows, "mean_flexible": means, "missing": missing}, indent=1) + "\n")
    print(table(rows))
    if means:
        print("mean flexible pass@1: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in means.items()))
    if missing:
        print(f"missing (no report yet): {missing}")


if __name__ == "__main__":
    main()
