"""``ssb curate``: from graded rollouts to aligned teacher/student pairs with a hinted robust solution.

For each problem (in rollout order) with at least one correct and one wrong boxed answer among its untruncated
rollouts: pick a correct rollout and a rollout of the most common wrong answer (ties broken by an RNG seeded
with (curate.seed, problem id), the choice recorded), build the hinted teacher prompt, and generate the robust
solution (``curate.attempts`` samples, seeds from (curate.seed, id, j)) from the hinted view ``curate.template``
names (:data:`ssb.core.prompts.TEMPLATES`). It is kept only when it is an honest solution (:mod:`ssb.curate.judge`):
it stops by itself with a correct boxed answer (:func:`ssb.core.grading.grade`, ``grading.mode``), does not refer
to the attempts or the grading, and does not loop. Stops at ``curate.target_pairs`` or when the problems run out,
and says which.

Outputs under ``RUN_DIR/curate/``: ``teacher.jsonl`` and ``student.jsonl`` (line i of each is the same example),
``curation_stats.json`` (one status per problem, the counts add up to the number of problems; every rejected hinted
sample by reason; the template; and ``premise``, the hinted view against the bare model, :mod:`ssb.curate.premise`),
and, private to this stage, ``decisions.jsonl`` (every generated solution and
its verdict, the audit log and the resume point) with ``state.json`` (what it was made with: work of other
settings or rollouts is moved aside to ``curate.stale-<time>/``, never rewritten). With ``curate.export_hf: true``
the student pairs are also saved with ``datasets.Dataset.save_to_disk`` in ``hf/`` (columns ``id``, ``messages``:
the student's conversation, system + bare question + robust solution, the format TRL's SFT and GKD trainers take,
and ``answer``; ``datasets.load_from_disk`` reads it back).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from ssb.config import SSBConfig, config_hash, config_to_dict, save_config
from ssb.core.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    claim_dir,
    iter_jsonl,
    resumable,
    resume_prefix,
    sha256_file,
    sha256_text,
    weights_stamp,
)
from ssb.core.layout import RunLayout
from ssb.core.prompts import prompt_ids, student_messages, teacher_messages
from ssb.core.rollouts import read_rollouts, wrong_answer_groups
from ssb.curate.judge import DEFAULT_JUDGE, Judge, judge_solution, rejections
from ssb.curate.premise import premise_report
from ssb.engines import Engine, Sampling, derive_seed, make_engine

__all__ = ["STATUSES", "Judge", "choose_pair", "judge_solution", "run", "run_curation"]

DECISIONS = "decisions.jsonl"  # private: one line per generated candidate (audit log, resume point)
# Every problem ends in exactly one of these (kept problems beyond the target count as not_reached).
STATUSES = (
    "kept",
    "no_correct",
    "no_wrong",
    "prompt_too_long",
    "truncated",
    "no_boxed_answer",
    "robust_wrong",
    "leaks_hint",
    "repeats",
    "not_reached",
)


def choose_pair(problem_id: str, rollouts: list[dict], seed: int) -> tuple[str, dict | None]:
    """Pick (correct, most-common-wrong) rollouts, or say why there is no pair.

    Only untruncated rollouts count; a wrong one must have a boxed answer. Wrong answers are grouped with
    :func:`ssb.core.grading.cluster_answers`; among the most frequent groups, and within groups, an RNG seeded by
    (seed, id) decides. Returns (status, choice) with status "ok", "no_correct" or "no_wrong".
    """
    done = sorted((r for r in rollouts if r["finish_reason"] == "stop"), key=lambda r: r["sample"])
    correct = [r for r in done if r["correct"]]
    if not correct:
        return "no_correct", None
    groups = wrong_answer_groups(done)
    if not groups:
        return "no_wrong", None
    top = max(len(g) for g in groups)
    tied = [g for g in groups if len(g) == top]
    rng = random.Random(derive_seed(seed, problem_id, "pair"))
    group = rng.choice(tied)
    wrong_pick = rng.choice(group)
    correct_pick = rng.choice(correct)
    return "ok", {
        "correct_sample": correct_pick["sample"],
        "wrong_sample": wrong_pick["sample"],
        "wrong_answer": wrong_pick["answer"],
        "wrong_count": top,
        "tied_answers": [g[0]["answer"] for g in tied],
        "correct_text": correct_pick["text"],
        "wrong_text": wrong_pick["text"],
    }


def run_curation(
    cfg: SSBConfig,
    *,
    engine: Engine | None = None,
    resume: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Curate RUN_DIR/rollout into RUN_DIR/curate; return the stats dict (also written to curation_stats.json)."""
    layout = RunLayout(cfg.run_dir)
    out_dir = layout.curate
    problems, by_id = read_rollouts(layout)
    status: dict[str, str] = {}
    candidates = []  # (problem, choice) for problems with a pair, in problem order
    for p in problems:
        verdict, choice = choose_pair(p["id"], by_id[p["id"]], cfg.curate.seed)
        if verdict == "ok":
            candidates.append((p, choice))
        else:
            status[p["id"]] = verdict

    # Resume: decisions.jsonl holds one line per generated candidate, in candidate order, whole batches.
    batch = max(1, cfg.engine.batch_size)
    state = {"curate": _curation_hash(cfg), "model": config_hash(cfg.model), "backend": cfg.engine.backend}
    state["grading"] = config_hash(cfg.grading)
    state["weights"] = weights_stamp(cfg.model.name_or_path)
    state["rollouts"] = sha256_file(layout.rollouts)[:16]
    state["batch_size"] = batch
    path = out_dir / DECISIONS
    decisions: list[dict] = []
    if resumable(out_dir, state, resume) and path.exists():
        decisions = [r for _, r in iter_jsonl(path, tolerate_partial_tail=True)]
    start = resume_prefix(decisions, [p["id"] for p, _ in candidates], 1, batch)
    decisions = decisions[:start]

    target = cfg.curate.target_pairs
    kept = sum(d["status"] == "kept" for d in decisions)
    sampling = Sampling.from_config(cfg.curate, n=cfg.curate.attempts)
    owned = engine is None
    if start < len(candidates) and kept < target and engine is None:
        engine = make_engine(cfg.model, cfg.engine)  # the model loads: the last input to validate
    bar = None
    try:
        # decisions and pairs of other settings or rollouts are moved aside (curate.stale-<time>/), never rewritten
        outputs = [DECISIONS, layout.curate_teacher.name, layout.curate_stats.name]
        claim_dir(out_dir, state, outputs, tag="ssb curate", resume=resume)
        save_config(cfg, out_dir)
        atomic_write_jsonl(path, decisions)
        bar = tqdm(total=len(candidates), initial=start, unit="problem", desc="curate", dynamic_ncols=True)
        lo = start
        while lo < len(candidates) and kept < target:
            chunk = candidates[lo : lo + batch]
            new = generate_batch(engine, chunk, sampling, cfg.engine.max_model_len, Judge.from_config(cfg))
            append_jsonl(path, new)
            decisions.extend(new)
            kept += sum(d["status"] == "kept" for d in new)
            lo += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(pairs=f"{min(kept, target)}/{target}")  # a batch may keep more than the target needs
            if on_batch is not None:
                on_batch(lo // batch)
    finally:
        if bar is not None:
            bar.close()
        if owned and engine is not None:
            engine.close()
    return _finish(cfg, layout, problems, status, candidates, decisions, by_id)


def generate_batch(
    engine: Engine, chunk: list, sampling: Sampling, max_model_len: int | None, judge: Judge = DEFAULT_JUDGE
) -> list[dict]:
    """Robust solutions for one batch of candidates from ``judge.prompts``' hinted view; one decision record each."""
    records: list[dict] = []
    todo = []
    for p, choice in chunk:
        conv = teacher_messages(p["question"], choice["correct_text"], choice["wrong_text"], judge.prompts)
        rec = {"id": p["id"], "status": "", **{k: v for k, v in choice.items() if not k.endswith("_text")}}
        records.append(rec)
        if max_model_len is not None and len(prompt_ids(engine.tokenizer, conv)) >= max_model_len:
            rec.update(status="prompt_too_long", solution=None)
        else:
            todo.append((rec, conv, p["answer"]))
    outs = engine.generate(
        [c for _, c, _ in todo], sampling, seed_keys=[r["id"] for r, _, _ in todo], desc="curate (hinted)"
    )
    for (rec, _, gold), comps in zip(todo, outs):
        # curate.attempts > 1: the first correct attempt is kept (else the first attempt's verdict stands);
        # every attempt's verdict is recorded, so the hinted teacher's accuracy stays measurable.
        verdicts = [judge(c.text, c.finish_reason, gold) for c in comps]
        pick = verdicts.index("kept") if "kept" in verdicts else 0
        comp = comps[pick]
        rec.update(
            status=verdicts[pick],
            solution=comp.text,
            finish_reason=comp.finish_reason,
            num_tokens=comp.num_tokens,
            attempt=pick,
            attempt_statuses=verdicts,
        )
    return records


def _finish(cfg: SSBConfig, layout: RunLayout, problems, status, candidates, decisions, rollouts) -> dict:
    """Write teacher/student pairs (first ``target_pairs`` kept, in problem order) and the stats."""
    target = cfg.curate.target_pairs
    prompts = Judge.from_config(cfg).prompts
    by_id = {d["id"]: d for d in decisions}
    teacher, student = [], []
    for p, choice in candidates:
        d = by_id.get(p["id"])
        if d is None or len(teacher) >= target:
            status[p["id"]] = "not_reached"
            continue
        status[p["id"]] = d["status"]
        if d["status"] != "kept":
            continue
        reply = {"role": "assistant", "content": d["solution"]}
        teacher_conv = teacher_messages(p["question"], choice["correct_text"], choice["wrong_text"], prompts)
        teacher.append({"id": p["id"], "messages": [*teacher_conv, reply], "answer": p["answer"]})
        student.append({"id": p["id"], "messages": [*student_messages(p["question"]), reply], "answer": p["answer"]})
    atomic_write_jsonl(layout.curate_teacher, teacher)
    atomic_write_jsonl(layout.curate_student, student)
    if cfg.curate.export_hf:
        export_hf(student, layout.curate_hf)
    counts = {s: 0 for s in STATUSES}
    for p in problems:
        counts[status[p["id"]]] += 1
    stats = {
        "problems": len(problems),
        "pairs": len(teacher),
        "target_pairs": target,
        "stop_reason": "target_reached" if len(teacher) >= target else "dataset_exhausted",
        "candidates": len(candidates),
        "generated": len(decisions),
        "status_counts": counts,
        "hinted_attempts": hinted_attempts(decisions),
        "rejections": rejections(decisions),
        "template": {"name": prompts.name, "digest": prompts.digest()},
        "premise": premise_report(decisions, rollouts, seed=cfg.curate.seed),
    }
    atomic_write_json(layout.curate_stats, stats)
    return stats


NO_PAIR_CHANGE = ("export_hf", "require_better_teacher", "val_problems")  # curate keys that change no decision


def _curation_hash(cfg: SSBConfig) -> str:
    """``config_hash(cfg.curate)`` without :data:`NO_PAIR_CHANGE`: those never invalidate finished work."""
    section = {k: v for k, v in config_to_dict(cfg.curate).items() if k not in NO_PAIR_CHANGE}
    return sha256_text(json.dumps(section, sort_keys=True))[:16]


def export_hf(rows: list[dict], out: Path) -> Path:
    """``rows`` (student.jsonl's records) as a Hugging Face dataset in ``out`` (replaced whole, never half-written)."""
    import datasets

    cols = ("id", "messages", "answer")
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        }
    )
    table = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in cols}, features=features)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    table.save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def hinted_attempts(decisions: list[dict]) -> dict:
    """Every hinted sample generated and how many were kept: the hinted teacher's accuracy on curated problems
    (a candidate whose prompt was too long counts as one attempt that was not kept)."""
    statuses = [s for d in decisions for s in d.get("attempt_statuses", [d.get("status")])]
    return {"total": len(statuses), "kept": sum(s == "kept" for s in statuses)}


def run(cfg: SSBConfig, *, resume: bool = True, engine: Engine | None = None) -> int:
    """``ssb curate``: RUN_DIR/rollout -> RUN_DIR/curate/{teacher,student}.jsonl + curation_stats.json."""
    out_dir = RunLayout(cfg.run_dir).curate
    stats = run_curation(cfg, engine=engine, resume=resume)
    print(
        f"[ssb curate] {stats['pairs']} pairs from {stats['problems']} problems ({stats['stop_reason']});"
        f" statuses: {stats['status_counts']} -> {out_dir}",
        file=sys.stderr,
    )
    rejected = {k: v for k, v in stats["rejections"].items() if v}
    print(
        f"[ssb curate] hinted samples rejected ({stats['template']['name']} template): {rejected or 'none'}",
        file=sys.stderr,
    )
    print(f"[ssb curate] {stats['premise']['line']}", file=sys.stderr)
    return 0
