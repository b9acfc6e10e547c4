"""``ssb rollout``: K graded samples per problem. Also the public home of the generation engines.

The engines live in :mod:`ssb.engines` (vLLM in ``engines_vllm``, HF in ``engines_hf``) and are re-exported here.

Outputs under ``RUN_DIR/rollout/``: ``problems.jsonl`` (the loaded problems, so curation needs no dataset),
``rollouts.jsonl`` (one line per sample: id, sample, text, extracted answer, gold, correct, finish_reason,
num_tokens), ``rollout_stats.json`` (counts that add up), ``timing.json`` and the resolved ``config.yaml``.
Resumable: batches are appended with fsync; a rerun keeps the complete batches and continues after them.
Sample ``j`` of problem ``id`` is drawn with seed ``derive_seed(rollout.seed, id, j)``, so a resumed run writes
the same file as an uninterrupted one. Truncated samples (finish_reason "length") never count as correct.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from ssb.config import SSBConfig, config_hash, save_config
from ssb.engines import Completion, Engine, Sampling, derive_seed, make_engine
from ssb.files import (
    InputError,
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    iter_jsonl,
    sha256_text,
    weights_stamp,
)
from ssb.prompts import student_messages

__all__ = [
    "Completion",
    "Engine",
    "Sampling",
    "derive_seed",
    "grade_sample",
    "make_engine",
    "resume_prefix",
    "rollout_sampling",
    "run_rollouts",
    "run_stage",
]

PROBLEMS = "problems.jsonl"
ROLLOUTS = "rollouts.jsonl"
STATS = "rollout_stats.json"
STATE = "state.json"
BatchHook = Callable[[int], None]  # called with the number of finished batches (tests raise here to "kill")


def rollout_sampling(cfg: SSBConfig) -> Sampling:
    r = cfg.rollout
    return Sampling(
        n=r.k, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, max_new_tokens=r.max_new_tokens, seed=r.seed
    )


def grade_sample(problem_id: str, sample: int, gold: str, completion: Completion) -> dict:
    """One rollouts.jsonl record. A truncated sample is never correct, whatever its text says."""
    from ssb.grading import extract_answer, is_correct

    truncated = completion.finish_reason == "length"
    return {
        "id": problem_id,
        "sample": sample,
        "text": completion.text,
        "answer": extract_answer(completion.text),
        "gold": gold,
        "correct": (not truncated) and is_correct(completion.text, gold),
        "finish_reason": completion.finish_reason,
        "num_tokens": completion.num_tokens,
    }


def resume_prefix(records: list[dict], ids: list[str], per_item: int, batch: int) -> int:
    """How many leading items of ``ids`` the existing ``records`` complete, rounded down to whole batches.

    Records must come in item order with ``per_item`` records each; anything after the first gap or
    mismatch is discarded (and regenerated), so an interrupted append never leaks into the result.
    """
    done = 0
    pos = 0
    while done < len(ids) and pos + per_item <= len(records):
        if any(r.get("id") != ids[done] for r in records[pos : pos + per_item]):
            break
        done += 1
        pos += per_item
    return done if done == len(ids) else (done // batch) * batch


def load_stage_problems(cfg: SSBConfig) -> tuple[list, dict]:
    """Problems of ``cfg.data`` plus a report of what the loader skipped (never silently)."""
    from ssb.data import load_problems

    d = cfg.data
    skipped: list = []
    problems = load_problems(
        d.source, d.split, subset=d.subset, limit=d.limit, skip_invalid=d.skip_invalid, **dict(d.field_map)
    )
    skipped = list(getattr(problems, "skipped", []) or [])
    report = {"source": d.source, "split": d.split, "loaded": len(problems), "skipped": len(skipped)}
    if skipped:
        report["skipped_examples"] = [str(s) for s in skipped[:20]]
    return list(problems), report


def _state(cfg: SSBConfig, problems: list) -> dict:
    ids_digest = sha256_text("\n".join(p.id + "\x00" + p.question + "\x00" + p.answer for p in problems))[:16]
    return {
        "model": config_hash(cfg.model),
        "weights": weights_stamp(cfg.model.name_or_path),
        "rollout": config_hash(cfg.rollout),
        "backend": cfg.engine.backend,
        "batch_size": cfg.engine.batch_size,
        "problems": ids_digest,
    }


def run_rollouts(
    cfg: SSBConfig,
    problems: list,
    out_dir: Path,
    *,
    engine: Engine | None = None,
    input_report: dict | None = None,
    resume: bool = True,
    on_batch: BatchHook | None = None,
) -> dict:
    """Sample, grade and append rollouts for ``problems`` into ``out_dir``; return the stats dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{cfg.data.source}: duplicate problem id {dup!r}")
    sampling = rollout_sampling(cfg)
    batch = max(1, cfg.engine.batch_size)
    path = out_dir / ROLLOUTS
    state = _state(cfg, problems)
    old_state = _read_json(out_dir / STATE)
    records: list[dict] = []
    if resume and old_state == state and path.exists():
        records = [r for _, r in iter_jsonl(path, tolerate_partial_tail=True)]
    elif path.exists():
        print(f"[ssb rollout] inputs changed or resume off: starting {path} over", file=sys.stderr)
    start = resume_prefix(records, ids, sampling.n, batch)
    atomic_write_jsonl(path, records[: start * sampling.n])  # drop a partial batch / partial line
    atomic_write_json(out_dir / STATE, state)
    atomic_write_jsonl(
        out_dir / PROBLEMS,
        ({"id": p.id, "question": p.question, "answer": p.answer, "source": p.source} for p in problems),
    )
    owned = engine is None
    if start < len(problems) and engine is None:
        engine = make_engine(cfg.model, cfg.engine)
    t0, new_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(problems), initial=start, unit="problem", desc="rollout", dynamic_ncols=True)
    try:
        for b, lo in enumerate(range(start, len(problems), batch), start=start // batch):
            chunk = problems[lo : lo + batch]
            outs = engine.generate(
                [student_messages(p.question) for p in chunk], sampling, seed_keys=[p.id for p in chunk]
            )
            recs = [grade_sample(p.id, j, p.answer, c) for p, cs in zip(chunk, outs) for j, c in enumerate(cs)]
            append_jsonl(path, recs)
            new_tokens += sum(r["num_tokens"] for r in recs)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
            if on_batch is not None:
                on_batch(b + 1)
    finally:
        bar.close()
        if owned and engine is not None:
            engine.close()
    elapsed = time.perf_counter() - t0
    stats = rollout_stats([r for _, r in iter_jsonl(path)], sampling.n, len(problems), input_report)
    atomic_write_json(out_dir / STATS, stats)
    timing = {"elapsed_s": elapsed, "new_tokens": new_tokens, "tokens_per_s": new_tokens / max(elapsed, 1e-9)}
    timing["resumed_from_problem"] = start
    atomic_write_json(out_dir / "timing.json", timing)
    return stats


def rollout_stats(records: list[dict], k: int, n_problems: int, input_report: dict | None) -> dict:
    """Counts over samples and problems; every sample and problem lands in exactly one bucket."""
    per_problem: dict[str, list[dict]] = {}
    for r in records:
        per_problem.setdefault(r["id"], []).append(r)
    truncated = sum(r["finish_reason"] == "length" for r in records)
    correct = sum(bool(r["correct"]) for r in records)
    no_answer = sum(r["finish_reason"] != "length" and r["answer"] is None for r in records)
    n_correct = [sum(bool(r["correct"]) for r in rs) for rs in per_problem.values()]
    return {
        "problems": n_problems,
        "k": k,
        "samples": {
            "total": len(records),
            "correct": correct,
            "wrong_answer": len(records) - correct - no_answer - truncated,
            "no_answer": no_answer,
            "truncated": truncated,
        },
        "problems_by_correct": {
            "all_correct": sum(c == k for c in n_correct),
            "mixed": sum(0 < c < k for c in n_correct),
            "none_correct": sum(c == 0 for c in n_correct),
        },
        "sample_accuracy": correct / max(len(records), 1),
        "generated_tokens": sum(r["num_tokens"] for r in records),
        "input": input_report or {},
    }


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_stage(cfg: SSBConfig, args: argparse.Namespace | None = None, *, engine: Engine | None = None) -> int:
    """``ssb rollout``: load ``cfg.data``, sample ``cfg.rollout.k`` graded rollouts each into RUN_DIR/rollout."""
    out_dir = Path(cfg.run_dir) / "rollout"
    problems, report = load_stage_problems(cfg)
    save_config(cfg, out_dir)
    stats = run_rollouts(
        cfg, problems, out_dir, engine=engine, input_report=report, resume=getattr(args, "resume", True) is not False
    )
    s = stats["samples"]
    print(
        f"[ssb rollout] {stats['problems']} problems x {stats['k']}: {s['correct']} correct, {s['wrong_answer']} wrong,"
        f" {s['no_answer']} unboxed, {s['truncated']} truncated; {stats['problems_by_correct']['mixed']} mixed problems"
        f" -> {out_dir}",
        file=sys.stderr,
    )
    return 0
