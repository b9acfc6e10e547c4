"""The pieces of ``ssb curate --compare-templates`` (its resumable plan: :mod:`ssb.run.templates`): every hinted
template's premise report on held-out training problems.

The validation problems are ``data.split``'s problems ``data.limit`` .. ``data.limit + curate.val_problems``: the
source and split the run trains on, past the prefix it rolls out, so the run never sees them and the test split is
never read. On them: ``rollout.k`` bare samples each (the rollout settings), a correct/wrong pair per problem with
both (:func:`ssb.curate.choose_pair`), and, for every template of :data:`ssb.core.prompts.TEMPLATES`,
``curate.attempts`` hinted samples per pair (the curate settings), judged as curation judges them. The same bare
samples and pairs serve every template, so the templates differ only in the view. Best: the highest hinted accuracy
among the templates whose cut share is not above the bare model's beyond the CI (verdict not ``truncates_more``);
none when every template truncates more.
"""

from __future__ import annotations

from ssb.config import ConfigError, SSBConfig
from ssb.core import data
from ssb.core.files import InputError
from ssb.core.output import table
from ssb.core.prompts import student_messages
from ssb.core.rollouts import grade_sample
from ssb.curate import choose_pair, generate_batch
from ssb.curate.judge import Judge, rejections
from ssb.curate.premise import VERDICT_TEXT, premise_report
from ssb.engines import Engine, Sampling


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


def bare_samples(cfg: SSBConfig, engine: Engine, problems: list) -> dict[str, list[dict]]:
    """``rollout.k`` graded bare samples per validation problem (the rollout settings), by problem id."""
    batch = max(1, cfg.engine.batch_size)
    sampling = Sampling.from_config(cfg.rollout, n=cfg.rollout.k)
    bare: dict[str, list[dict]] = {}
    for lo in range(0, len(problems), batch):
        chunk = problems[lo : lo + batch]
        convs = [student_messages(p.question) for p in chunk]
        outs = engine.generate(convs, sampling, seed_keys=[p.id for p in chunk], desc="validation (bare)")
        for p, comps in zip(chunk, outs):
            bare[p.id] = [grade_sample(p.id, j, p.answer, c, cfg.grading.mode) for j, c in enumerate(comps)]
    return bare


def candidates(cfg: SSBConfig, problems: list, bare: dict[str, list[dict]]) -> list[tuple[dict, dict]]:
    """(problem record, chosen correct/wrong pair) for every validation problem with both outcomes."""
    out = []
    for p in problems:
        status, choice = choose_pair(p.id, bare[p.id], cfg.curate.seed)
        if status == "ok":
            out.append(({"id": p.id, "question": p.question, "answer": p.answer}, choice))
    return out


def template_report(cfg: SSBConfig, engine: Engine, name: str, pairs: list, bare: dict[str, list[dict]]) -> dict:
    """Template ``name``: ``curate.attempts`` hinted samples per pair, judged as curation judges them; its premise
    report against the same bare samples, what it kept and why it rejected the rest."""
    batch = max(1, cfg.engine.batch_size)
    sampling = Sampling.from_config(cfg.curate, n=cfg.curate.attempts)
    judge = Judge.from_config(cfg, name)
    decisions = [
        rec
        for lo in range(0, len(pairs), batch)
        for rec in generate_batch(engine, pairs[lo : lo + batch], sampling, cfg.engine.max_model_len, judge)
    ]
    return {
        "premise": premise_report(decisions, bare, seed=cfg.curate.seed),
        "kept": sum(d["status"] == "kept" for d in decisions),
        "rejections": rejections(decisions),
    }


def summary(cfg: SSBConfig, problem_ids: list[str], with_pair: int, rows: dict[str, dict]) -> dict:
    """The comparison: the validation problems, every template's report and the best template."""
    d = cfg.data
    best = best_template(rows)
    return {
        "validation": {
            "source": d.source,
            "split": d.split,
            "first": d.limit,
            "problems": len(problem_ids),
            "ids": problem_ids,
            "with_pair": with_pair,
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
