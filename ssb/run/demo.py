"""``ssb demo``: the whole pipeline on the embedded toy model, plus an SFT control and a report.

Stages (resumable, recorded in ``RUN_DIR/run.json``): rollout -> curate -> capture -> train (SSB: KD on the
stored teacher) -> train_sft (the control: same pairs, same LoRA, cross-entropy on the teacher's solution
tokens instead of the KD loss) -> train_rft (the baseline: CE on the base model's own correct rollouts, the SFT
control's token count, :mod:`ssb.run.rft`) -> eval (base, SSB, SFT and RFT students on the held-out toy test split,
one engine) -> report (``report.json``, ``report.md``, ``report.png``). The report reads only the stages' public
outputs (:class:`ssb.core.layout.RunLayout`) and ``run.json``.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
from collections.abc import Callable
from pathlib import Path

from ssb.config import SSBConfig
from ssb.core.files import atomic_write_json, atomic_write_text, iter_jsonl
from ssb.core.layout import RunLayout
from ssb.core.models import merged_model
from ssb.core.output import fmt_mb, fmt_rate
from ssb.run import outputs
from ssb.run.plan import Stage, stage
from ssb.run.rft import RFT, rft_config, train_rft
from ssb.run.rounds import ensure_student
from ssb.run.runner import EXIT_STOPPED, load_manifest, run_pipeline

SFT = "train_sft"  # train.output_subdir of the SFT control
TRAINED = {"ssb": "train", "sft": SFT, "rft": RFT}  # label -> train.output_subdir
QWEN_VOCAB = 151936  # dense float32 logits of Qwen2.5 cost 4 * 151936 bytes per distilled token
RUNS = ("base", "ssb", "sft", "rft")  # the models of every demo (:func:`_students`), then later rounds' SSB


def sft_config(cfg: SSBConfig) -> SSBConfig:
    """The SFT control: the SSB training config with CE on the solution tokens instead of KD."""
    train = dataclasses.replace(cfg.train, kd_weight=0.0, ce_weight=1.0, output_subdir=SFT)
    return dataclasses.replace(cfg, train=train)


def _train_sft(cfg: SSBConfig) -> int:
    from ssb.train import train

    train(sft_config(cfg), cfg.run_dir)
    return 0


def _students(cfg: SSBConfig) -> dict[str, Callable[[], str]]:
    """The one list of what the demo evaluates: label -> how to get its model directory (base, the SSB student, the
    SFT control, the RFT baseline, then SSB of rounds 2..R)."""
    layout = RunLayout(cfg.run_dir)

    def merged(sub: str) -> Callable[[], str]:
        return lambda: str(merged_model(cfg.model, layout.adapter(sub), layout.merged(sub)))

    def student(r: int) -> Callable[[], str]:
        return lambda: str(ensure_student(cfg, r))

    models = dict(zip(RUNS, (lambda: cfg.model.name_or_path, student(1), merged(SFT), merged(RFT)), strict=True))
    models.update({f"ssb_round{r}": student(r) for r in range(2, cfg.rounds + 1)})
    return models


def eval_models(cfg: SSBConfig) -> dict[str, str]:
    """Label -> model directory for the demo eval (:func:`_students`). LoRAs are merged into plain weights first:
    vLLM's CPU LoRA path is ~5x slower than the plain model on this tiny network, and the merged weights are the
    same function up to float rounding."""
    return {label: get() for label, get in _students(cfg).items()}


def _eval_all(cfg: SSBConfig) -> int:
    """Base, SSB (per round), SFT and RFT students on the eval benchmarks."""
    from ssb.eval import evaluate

    for label, path in eval_models(cfg).items():
        model = dataclasses.replace(cfg.model, name_or_path=path)
        evaluate(
            model, cfg.engine, cfg.eval, RunLayout(cfg.run_dir).eval / label, label=label, grading=cfg.grading.mode
        )
    return 0


def eval_labels(cfg: SSBConfig) -> list[str]:
    """The labels of :func:`eval_models`, without merging anything."""
    return list(_students(cfg))


def demo_plan() -> list[Stage]:
    return [
        *(stage(n) for n in ("rollout", "curate", "capture", "train")),
        Stage("train_sft", (), _train_sft, check=lambda cfg: outputs.train(sft_config(cfg))),
        Stage("train_rft", (), lambda cfg: train_rft(cfg, match=SFT), check=lambda cfg: outputs.train(rft_config(cfg))),
        Stage("eval", ("eval",), _eval_all, check=lambda cfg: outputs.results(cfg, eval_labels(cfg))),
    ]


def _hinted_pass1(curation: dict) -> tuple[float | None, int]:
    """Share of hinted robust solutions that came out correct (the teacher's ceiling on curated problems)."""
    h = curation["hinted_attempts"]
    return (h["kept"] / h["total"] if h["total"] else None), h["total"]


def _last_metric(path: Path, key: str) -> float | None:
    values = [rec[key] for _, rec in iter_jsonl(path) if key in rec] if path.exists() else []
    return values[-1] if values else None


def _sum_metric(path: Path, key: str) -> int:
    return sum(rec.get(key, 0) for _, rec in iter_jsonl(path)) if path.exists() else 0


def _mean_metric(path: Path, key: str) -> float | None:
    values = [rec[key] for _, rec in iter_jsonl(path) if key in rec] if path.exists() else []
    return sum(values) / len(values) if values else None


def _round_pairs(cfg: SSBConfig, r: int) -> dict:
    """Pairs a round curated and how many problems with both outcomes it sent to the teacher for them."""
    stats = json.loads(RunLayout(cfg.run_dir).round(r).curate_stats.read_text())
    return {"pairs": stats["pairs"], "tried": stats["candidates"]}


def build_report(cfg: SSBConfig) -> dict:
    """Collect the figures of a finished demo run into ``report.json`` / ``report.md`` / ``report.png``."""
    from ssb.eval.report import markdown_table, plot_runs
    from ssb.eval.stats import compare, load_results
    from ssb.store import TeacherStore, summarize

    layout = RunLayout(cfg.run_dir)
    labels = eval_labels(cfg)
    results = {label: load_results(layout.results(label)) for label in labels}
    bench = cfg.eval.benchmarks[0]

    def pass1(label: str) -> dict:
        return results[label]["benchmarks"][bench]["aggregates"]["pass@k"]["1"]

    store = summarize(TeacherStore(layout.store))
    curation = json.loads(layout.curate_stats.read_text())
    timing_path = layout.rollout_timing  # the last rollout session's wall time and tokens
    rollout_timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    hinted, hinted_n = _hinted_pass1(curation)
    stages = load_manifest(layout.root)["stages"]
    report = {
        "benchmark": bench,
        "protocol": results["base"]["protocol"],
        "base_pass1": pass1("base")["value"],
        "ssb_pass1": pass1("ssb")["value"],
        "sft_pass1": pass1("sft")["value"],
        "rft_pass1": pass1("rft")["value"],
        "ci95": {label: pass1(label)["ci"] for label in RUNS},
        "hinted_pass1": hinted,
        "hinted_attempts": hinted_n,
        "pairs": curation["pairs"],
        "curation": curation,
        "ssb_vs_base": compare(results["base"], results["ssb"]),
        "ssb_vs_sft": compare(results["sft"], results["ssb"]),
        "ssb_vs_rft": compare(results["rft"], results["ssb"]),
        "premise": curation.get("premise"),
        "rft_examples": sum(1 for _ in iter_jsonl(layout.train(RFT) / "pairs.jsonl")),
        "trained_tokens": {k: _sum_metric(layout.metrics(sub), "distilled_tokens") for k, sub in TRAINED.items()},
        "store_bytes_per_row": store["bytes_per_row"],
        "dense_bytes_per_row": store["dense_fp32_bytes_per_row"],
        "dense_bytes_per_row_qwen": 4 * QWEN_VOCAB,
        "store": store,
        "stage_seconds": {name: rec.get("seconds") for name, rec in stages.items()},
        "tokens_per_s": {
            "rollout": rollout_timing.get("tokens_per_s"),
            "train_ssb": _mean_metric(layout.metrics(), "distilled_tokens_per_s"),
            "train_sft": _mean_metric(layout.metrics(SFT), "distilled_tokens_per_s"),
            "train_rft": _mean_metric(layout.metrics(RFT), "distilled_tokens_per_s"),
        },
        "train_peak_memory_mb": _last_metric(layout.metrics(), "peak_memory_mb"),
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seed": cfg.seed,
        "rounds": [
            {"round": r, "ssb_pass1": pass1("ssb" if r == 1 else f"ssb_round{r}")["value"], **_round_pairs(cfg, r)}
            for r in range(1, cfg.rounds + 1)
        ],
    }
    runs = [results[label] for label in labels]
    chart = plot_runs(runs, layout.report("png"))
    md = render_markdown(report, markdown_table(runs))
    atomic_write_json(layout.report("json"), report)
    atomic_write_text(layout.report("md"), md)
    report["chart"] = str(chart)
    return report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_markdown(r: dict, eval_table: str) -> str:
    lo = {k: f"[{_pct(v[0])}, {_pct(v[1])}]" for k, v in r["ci95"].items()}
    cmp = r["ssb_vs_base"]
    lines = [
        f"# SSB demo report (seed {r['seed']}, benchmark {r['benchmark']}, protocol {r['protocol']['name']})",
        "",
        "| model | pass@1 | 95% CI |",
        "|---|---|---|",
        f"| base student (bare question) | {_pct(r['base_pass1'])} | {lo['base']} |",
        f"| SSB student (KD on hinted teacher) | {_pct(r['ssb_pass1'])} | {lo['ssb']} |",
        f"| SFT control (CE on the same solutions) | {_pct(r['sft_pass1'])} | {lo['sft']} |",
        f"| RFT baseline (CE on {r['rft_examples']} own correct rollouts, SFT's token count) | "
        f"{_pct(r['rft_pass1'])} | {lo['rft']} |",
        f"| hinted teacher (ceiling, curated problems, n={r['hinted_attempts']}) | {_pct(r['hinted_pass1'])} | |",
        *(
            f"| SSB student after round {x['round']} ({x['pairs']} pairs from {x['tried']} mixed problems tried) | "
            f"{_pct(x['ssb_pass1'])} | |"
            for x in r["rounds"][1:]
        ),
        "",
        f"SSB vs base, paired over problems: {_paired(cmp, r['benchmark'])}",
        f"SSB vs SFT, paired over problems: {_paired(r['ssb_vs_sft'], r['benchmark'])}",
        f"SSB vs RFT, paired over problems: {_paired(r['ssb_vs_rft'], r['benchmark'])}",
        "",
        f"Teacher {(r['premise'] or {}).get('line', 'premise: not measured')}.",
        f"Trained tokens: {', '.join(f'{k} {v:,}' for k, v in r['trained_tokens'].items())}.",
        "",
        f"Pairs curated: {r['pairs']} ({r['curation'].get('stop_reason')}). Teacher store: "
        f"{r['store_bytes_per_row']:.0f} bytes/row vs {r['dense_bytes_per_row']} dense float32 at this vocabulary "
        f"({r['dense_bytes_per_row_qwen']} at Qwen2.5's 151,936).",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in r["stage_seconds"].items() if v is not None),
        "",
        f"Throughput: {_rates(r['tokens_per_s'])}. Train peak memory {fmt_mb(r['train_peak_memory_mb'])}; "
        f"process max RSS {fmt_mb(r['process_max_rss_mb'])}.",
        "",
        "## Evaluation detail",
        "",
        eval_table,
    ]
    return "\n".join(lines) + "\n"


def _rates(tokens_per_s: dict) -> str:
    """``{"rollout": 1401.53, "train_ssb": 812.9}`` -> "rollout 1,402 tokens/s, train ssb 813 tokens/s"."""
    parts = [f"{k.replace('_', ' ')} {fmt_rate(v)} tokens/s" for k, v in tokens_per_s.items() if v is not None]
    return ", ".join(parts) or "n/a"


def _paired(cmp: dict, bench: str) -> str:
    t = cmp["benchmarks"][bench]
    lo, hi = t["diff_ci"]
    return (
        f"difference {100 * t['diff']:+.1f} points (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}), "
        f"p_bootstrap={t['p_bootstrap']:.3g}; {t['wins']} problems better, {t['losses']} worse, "
        f"{t['ties']} tied; sign test p={t['p_sign']:.3g}"
    )


def demo(cfg: SSBConfig, *, out: str | Path | None = None, from_stage: str | None = None) -> int:
    """``ssb demo``: run :func:`demo_plan` into ``out`` (default ``cfg.run_dir``), then print the report."""
    if out:
        cfg = dataclasses.replace(cfg, run_dir=str(out))
    manifest = run_pipeline(cfg, from_stage=from_stage, plan=demo_plan())  # StageFailed: the CLI prints it
    if manifest.get("stopped"):
        print(f"ssb demo: stopped after {manifest['stopped']['after']}, no report", file=sys.stderr)
        return EXIT_STOPPED
    report = build_report(cfg)
    print(RunLayout(cfg.run_dir).report("md").read_text())
    print(f"ssb demo: report in {cfg.run_dir}/report.json, chart {report['chart']}")
    return 0
