"""``ssb eval``: base model, adapter or round students on MATH500 / AIME2024 / GSM8K / toy / any JSONL.

:mod:`~ssb.eval.protocols` (named presets), :mod:`~ssb.eval.scoring` (one model, resumable), :mod:`~ssb.eval.stats`
(pass@k, maj@k, bootstrap CIs, paired tests) and :mod:`~ssb.eval.report` (tables, chart). Layout of ``OUT``
(default ``RUN_DIR/eval``): ``<label>/results.json`` and ``<label>/partial/`` per evaluated model, plus
``report.md`` (tables, paired test) and ``chart.png`` (pass@1 with 95% CIs) over all of them.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ssb.config import SSBConfig
from ssb.core.files import atomic_write_json
from ssb.core.layout import RunLayout
from ssb.core.models import check_adapter
from ssb.core.tracking import open_tracker
from ssb.eval.protocols import PROTOCOLS, Protocol, resolve_protocol
from ssb.eval.report import plot_runs, print_compare, write_report
from ssb.eval.scoring import evaluate
from ssb.eval.stats import compare, load_results, results_path

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "compare",
    "compare_files",
    "evaluate",
    "load_results",
    "resolve_protocol",
    "run",
    "scored",
]


def scored(cfg: SSBConfig, adapter: str | None = None) -> list[tuple[str, str | None]]:
    """``(label, adapter)`` of every model ``ssb eval`` scores: the base (``eval.include_base``, or when there is no
    adapter), then the adapter named (``adapter``, ``eval.adapter``) or else the trained one, if any ("ssb")."""
    trained = RunLayout(cfg.run_dir).adapter(cfg.train.output_subdir)
    adapter = adapter or cfg.eval.adapter
    if adapter is None and (trained / "adapter_config.json").exists():
        adapter = str(trained)
    base = [("base", None)] if cfg.eval.include_base or adapter is None else []
    return base + ([("ssb" if adapter == str(trained) else Path(adapter).name, adapter)] if adapter else [])


def run(
    cfg: SSBConfig,
    *,
    adapter: str | None = None,
    out: str | Path | None = None,
    students: list[tuple[str, Path]] | None = None,
) -> int:
    """``ssb eval``: the base model and one adapter (``adapter``, ``eval.adapter`` or ``RUN_DIR/train/adapter``),
    or, with ``students`` (``(label, merged model dir)``, from ``ssb.run.rounds``), the base and each student."""
    layout = RunLayout(cfg.run_dir)
    out = Path(out) if out is not None else layout.eval
    if students is not None:
        return _eval_models(cfg, out, students)
    plan = scored(cfg, adapter)
    adapter = plan[-1][1]
    if adapter is not None and cfg.train.qlora:
        print(
            "ssb eval: warning: QLoRA adapter evaluated on the base as model.dtype loads it (engines do not "
            "quantise to 4-bit), not on the NF4 base it was trained against",
            file=sys.stderr,
        )
    rank = check_adapter(cfg.model, adapter) if adapter is not None else None  # before the base eval starts
    engine = None
    if adapter is not None and len(plan) > 1:  # one engine serves base and adapter (per-call LoRA)
        from ssb.engines import make_engine

        engine = make_engine(cfg.model, cfg.engine, enable_lora=True, max_lora_rank=rank)
    try:
        runs = [
            evaluate(
                cfg.model,
                cfg.engine,
                cfg.eval,
                out / label,
                adapter=ad,
                label=label,
                engine=engine,
                grading=cfg.grading.mode,
            )
            for label, ad in plan
        ]
    finally:
        if engine is not None:
            engine.close()
    report, chart = write_report(runs, out)
    track(cfg, runs, out)
    print(report.read_text())
    print(f"ssb eval: results in {', '.join(str(out / lb / 'results.json') for lb, _ in plan)}; chart {chart}")
    return 0


def _eval_models(cfg: SSBConfig, out: Path, students: list[tuple[str, Path]]) -> int:
    """The base (``eval.include_base``) and every student (merged weights, one engine each), one report."""
    models = ([("base", cfg.model)] if cfg.eval.include_base else []) + [
        (label, dataclasses.replace(cfg.model, name_or_path=str(path))) for label, path in students
    ]
    runs = [
        evaluate(model, cfg.engine, cfg.eval, out / label, label=label, grading=cfg.grading.mode)
        for label, model in models
    ]
    report, chart = write_report(runs, out)
    track(cfg, runs, out)
    print(report.read_text())
    print(f"ssb eval: results per model in {', '.join(str(out / lb / 'results.json') for lb, _ in models)}")
    return 0


def track(cfg: SSBConfig, runs: list[dict], out: Path) -> None:
    """Each model's per-benchmark summary (pass@1, pass@n, maj@n, rates) to ``train.report_to``'s trackers, under
    ``OUT/tb`` as ``eval/<label>/<benchmark>/<metric>`` (:mod:`ssb.core.tracking`); nothing when the list is empty."""
    tracker = open_tracker(cfg.train.report_to, out, run_name=f"{cfg.run_dir}/eval")
    if tracker is None:
        return
    for results in runs:
        tracker.log_eval(results)
    tracker.close()


def compare_files(a: str | Path, b: str | Path, out: str | Path | None = None) -> int:
    """``ssb eval --compare A B``: both tables and the paired test; with ``out``, ``compare.json`` and a chart.
    A and B are results files, or eval or run directories (:func:`~ssb.eval.stats.results_path`)."""
    pa, pb = results_path(a), results_path(b)
    print(f"ssb eval --compare: A = {pa}, B = {pb}", file=sys.stderr)
    ra, rb = load_results(pa), load_results(pb)
    cmp = print_compare(ra, rb)
    if out is not None:
        atomic_write_json(Path(out) / "compare.json", cmp)
        print(f"chart: {plot_runs([ra, rb], Path(out) / 'compare.png')}")
    return 0
