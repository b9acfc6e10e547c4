"""``ssb curate --compare-templates``: every hinted template's premise report on held-out training problems.

The validation problems are ``data.split``'s problems ``data.limit`` .. ``data.limit + curate.val_problems``: the
source and split the run trains on, past the prefix it rolls out, so the run never sees them and the test split is
never read. On them: ``rollout.k`` bare samples each (the rollout settings), a correct/wrong pair per problem with
both (:func:`ssb.curate.choose_pair`), and, for every template of :data:`ssb.core.prompts.TEMPLATES`,
``curate.attempts`` hinted samples per pair (the curate settings), judged as curation judges them. The same bare
samples and pairs serve every template, so the templates differ only in the view. Best: the highest hinted accuracy
among the templates whose cut share is not above the bare model's beyond the CI (verdict not ``truncates_more``);
none when every template truncates more. Written to ``RUN_DIR/compare_templates.json`` and printed.
"""

from __future__ import annotations

import sys

from ssb.config import ConfigError, SSBConfig
from ssb.core import data
from ssb.core.files import InputError, atomic_write_json
from ssb.core.output import table
from ssb.core.prompts import TEMPLATES, student_messages
from ssb.core.rollouts import grade_sample
from ssb.curate import choose_pair, generate_batch
from ssb.curate.judge import Judge, rejections
from ssb.curate.premise import VERDICT_TEXT, premise_report
from ssb.engines import Engine, Sampling, make_engine

OUT_NAME = "compare_templates.json"


def validation_problems(cfg: SSBConfig) -> list:
    """The held-out training problems (see the module docstring); refuses the test split and a run without a limit."""
    d = cfg.data
    if d.split == "test":
        raise ConfigError(
            "data.split=test: --compare-templates holds out *training* problems; the test split is "
            "never used to choose a template",
            "data.split",
        )
    if d.limit is None:
        raise ConfigError(
            "data.limit: null rolls out every problem of data.split, so none is held out for "
            "--compare-templates; set data.limit",
            "data.limit",
        )
    problems = data.load_problems(
        d.source,
        d.split,
        subset=d.subset,
        limit=d.limit + cfg.curate.val_problems,
        skip_invalid=d.skip_invalid,
        **dict(d.field_map),
    )
    held_out = list(problems)[d.limit :]
    if not held_out:
        raise InputError(f"data.source={d.source} (split {d.split}): no problems past data.limit={d.limit} to hold out")
    return held_out


def compare_templates(cfg: SSBConfig, *, engine: Engine | None = None, names: list[str] | None = None) -> dict:
    """The premise report of every template in ``names`` (default: all) on :func:`validation_problems`."""
    problems = validation_problems(cfg)
    names = list(names or TEMPLATES)
    batch = max(1, cfg.engine.batch_size)
    owned = engine is None
    engine = make_engine(cfg.model, cfg.engine) if owned else engine
    try:
        bare_sampling = Sampling.from_config(cfg.rollout, n=cfg.rollout.k)
        bare: dict[str, list[dict]] = {}
        for lo in range(0, len(problems), batch):
            chunk = problems[lo : lo + batch]
            convs = [student_messages(p.question) for p in chunk]
            outs = engine.generate(convs, bare_sampling, seed_keys=[p.id for p in chunk], desc="validation (bare)")
            for p, comps in zip(chunk, outs):
                bare[p.id] = [grade_sample(p.id, j, p.answer, c, cfg.grading.mode) for j, c in enumerate(comps)]
        candidates = []
        for p in problems:
            status, choice = choose_pair(p.id, bare[p.id], cfg.curate.seed)
            if status == "ok":
                candidates.append(({"id": p.id, "question": p.question, "answer": p.answer}, choice))
        sampling = Sampling.from_config(cfg.curate, n=cfg.curate.attempts)
        rows = {}
        for name in names:
            judge = Judge.from_config(cfg, name)
            decisions = [
                rec
                for lo in range(0, len(candidates), batch)
                for rec in generate_batch(
                    engine, candidates[lo : lo + batch], sampling, cfg.engine.max_model_len, judge
                )
            ]
            rows[name] = {
                "premise": premise_report(decisions, bare, seed=cfg.curate.seed),
                "kept": sum(d["status"] == "kept" for d in decisions),
                "rejections": rejections(decisions),
            }
    finally:
        if owned:
            engine.close()
    d = cfg.data
    best = best_template(rows)
    return {
        "validation": {
            "source": d.source,
            "split": d.split,
            "first": d.limit,
            "problems": len(problems),
            "ids": [p.id for p in problems],
            "with_pair": len(candidates),
        },
        "templates": rows,
        "best": best,
        "best_is_better_than_bare": best is not None and rows[best]["premise"]["verdict"] == "better",
    }


def best_template(rows: dict[str, dict]) -> str | None:
    """The highest hinted accuracy among templates not cut more than the bare model; on a tie the one cut least,
    then the first in registry order; None when no template qualifies."""
    ok = [n for n, r in rows.items() if r["premise"]["verdict"] in ("better", "not_more_accurate")]
    hinted = {n: rows[n]["premise"]["hinted"] for n in ok}
    return max(ok, key=lambda n: (hinted[n]["accuracy"]["value"], -hinted[n]["truncation"]["value"]), default=None)


def render(result: dict) -> str:
    """The comparison as a text table plus the verdict line."""

    def pct(side: dict, what: str) -> str:
        lo, hi = side[what]["ci"]
        return f"{100 * side[what]['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    rows = []
    for name, r in result["templates"].items():
        p = r["premise"]
        if not p["problems"]:
            rows.append((name, "-", "-", "-", "-", r["kept"], VERDICT_TEXT[p["verdict"]]))
            continue
        rates = [pct(p[side], what) for side in ("hinted", "bare") for what in ("accuracy", "truncation")]
        rows.append((name, *rates, r["kept"], p["verdict"]))
    v = result["validation"]
    head = (
        f"hinted templates on {v['problems']} held-out {v['source']} [{v['split']}] problems (from index {v['first']}; "
        f"{v['with_pair']} with a correct and a wrong bare sample), per attempt, 95% CIs:"
    )
    header = ("template", "hinted correct", "hinted cut", "bare correct", "bare cut", "kept", "verdict")
    best = result["best"]
    tail = (
        f"best: {best}" + ("" if result["best_is_better_than_bare"] else " (but no better than the bare model)")
        if best
        else "best: none (every template is cut more often than the bare model)"
    )
    return "\n".join([head, table(rows, header=header), tail])


def run(cfg: SSBConfig, *, engine: Engine | None = None) -> int:
    """``ssb curate --compare-templates``: write RUN_DIR/compare_templates.json and print the table."""
    from pathlib import Path

    result = compare_templates(cfg, engine=engine)
    out = Path(cfg.run_dir) / OUT_NAME
    atomic_write_json(out, result)
    print(render(result))
    print(f"[ssb curate] template comparison -> {out}", file=sys.stderr)
    return 0
