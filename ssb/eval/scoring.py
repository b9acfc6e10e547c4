"""Scoring one model on the eval benchmarks under a protocol (:mod:`ssb.eval.protocols`), resumable.

Per benchmark, problems are generated in batches through :func:`ssb.engines.make_engine` (vLLM with ``LoRARequest``
or HF + ``PeftModel``); each finished batch is graded in a process pool while the next one generates
(math-verify's timeouts use ``SIGALRM``, which only works in a process's main thread, hence processes), and
graded problems are appended to ``OUT/partial/<benchmark>.jsonl`` (private to this stage), so an interrupted eval
resumes where it stopped; a partial made under another protocol, model or adapter is moved aside
(``partial.stale-<time>/``) with a message, and so is a ``results.json`` of other settings (``OUT.stale-<time>/``).
Metrics live in :mod:`ssb.eval.stats`, tables and the chart in :mod:`ssb.eval.report`.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ssb.config import EngineConfig, EvalConfig, ModelConfig, config_to_dict
from ssb.core.files import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    move_aside,
    read_json,
    read_jsonl,
    sha256_file,
    sha256_text,
    weights_stamp,
)
from ssb.core.procs import die_with_parent
from ssb.eval.protocols import Protocol, resolve_protocol
from ssb.eval.report import markdown_table
from ssb.eval.stats import aggregate

RESULTS_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Grading (runs in worker processes)


def grade_problem(samples: list[tuple[str, str]], gold: str, mode: str = "strict") -> list[dict]:
    """Per ``(text, finish_reason)`` sample: the extracted answer, the verdict (:func:`ssb.core.grading.grade`: a
    truncated reply is wrong), whether the answer alone was right, the answer cluster (index of the first
    equivalent answer; None for no answer or a truncated reply, which do not vote in maj@k), and ``by_mode``, the
    verdict under every grading mode."""
    from ssb.core.grading import GRADING_MODES, cluster_answers, grade

    # every mode's verdicts (each sample graded once per mode), so reports show strict and flexible side by side
    # whatever the protocol's mode; the protocol's own mode gives the sample's verdict
    modes = dict.fromkeys((mode, *GRADING_MODES))  # the protocol's first: an unknown mode raises grade's error
    graded = {m: [grade(t, gold, finish_reason=r, mode=m) for t, r in samples] for m in modes}
    verdicts = graded[mode]
    clusters = cluster_answers([None if v.status == "truncated" else v.answer for v in verdicts])
    return [
        {
            "pred": v.answer,
            "correct": v.correct,
            "answer_correct": v.answer_correct,
            "cluster": c,
            "by_mode": {m: graded[m][i].correct for m in GRADING_MODES},
        }
        for i, (v, c) in enumerate(zip(verdicts, clusters, strict=True))
    ]


def grade_batch(items: list[tuple[list[tuple[str, str]], str]], mode: str = "strict") -> list[list[dict]]:
    return [grade_problem(samples, gold, mode) for samples, gold in items]


class InlineExecutor(Executor):
    """``grader_workers=0``: grade synchronously in this process (debugging, tiny runs)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(e)
        return fut


def make_grader_pool(workers: int) -> Executor:
    if workers <= 0:
        return InlineExecutor()
    # spawn, not fork: the parent holds engine threads (vLLM, torch) that a fork would copy half-locked; each
    # worker dies with this process (even on SIGKILL) and leaves Ctrl-C to it (ssb.core.procs)
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )


# --------------------------------------------------------------------------------------------------
# One model on one benchmark, resumable


def _spec(
    protocol: Protocol, model_cfg: ModelConfig, engine_cfg: EngineConfig, adapter: str | None, bench: str
) -> dict:
    """What a partial result depends on; a mismatch on resume means the old partial is set aside."""
    adapter_sha = None
    if adapter is not None:
        weights = sorted(Path(adapter).glob("adapter_model.*"))
        if not weights:
            raise FileNotFoundError(f"{adapter}: no adapter_model.safetensors/.bin (not a PEFT adapter directory)")
        adapter_sha = sha256_file(weights[0])[:16]
    return {
        "benchmark": bench,
        "protocol": dataclasses.asdict(protocol),
        "model": config_to_dict(model_cfg),
        "model_files": weights_stamp(model_cfg.name_or_path),
        "backend": engine_cfg.backend,
        "adapter": adapter,
        "adapter_sha": adapter_sha,
    }


def _load_partial(path: Path, meta_path: Path, spec: dict) -> dict[str, dict]:
    """Graded problems already on disk for ``spec``; a partial made under another spec is moved aside (reported)."""
    if not path.exists():
        atomic_write_json(meta_path, spec)
        return {}
    old = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if old != spec:
        stale = move_aside(path.parent, [n for n in (path.name, meta_path.name) if (path.parent / n).exists()])
        print(f"ssb eval: {path} was made with another protocol/model/adapter; moved to {stale}", file=sys.stderr)
        atomic_write_json(meta_path, spec)
        return {}
    return {rec["id"]: rec for rec in read_jsonl(path, tolerate_partial_tail=True)}


def _problem_record(problem: Any, completions: list, graded: list[dict]) -> dict:
    samples = [
        {"text": c.text, "n_tokens": len(c.token_ids), "finish_reason": c.finish_reason, **g}
        for c, g in zip(completions, graded, strict=True)
    ]
    return {
        "id": problem.id,
        "question": problem.question,
        "answer": problem.answer,
        "meta": problem.meta,
        "samples": samples,
    }


def evaluate_problems(
    engine_factory,
    problems: list,
    protocol: Protocol,
    spec: dict,
    partial_dir: Path,
    *,
    adapter: str | None,
    batch_size: int,
    seed: int,
    pool: Executor,
    desc: str,
) -> list[dict]:
    """Generate + grade ``problems`` (skipping those already in ``partial_dir``); return records in input order."""
    from tqdm import tqdm

    from ssb.engines import Sampling

    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{spec['benchmark']}: duplicate problem id {dup!r}; ids must be unique to resume")
    bench = spec["benchmark"].replace("/", "_")
    path, meta_path = partial_dir / f"{bench}.jsonl", partial_dir / f"{bench}.meta.json"
    done = _load_partial(path, meta_path, spec)
    todo = [(i, p) for i, p in enumerate(problems) if p.id not in done]
    pending: list[tuple[Future, list, list]] = []
    sampling = Sampling(
        n=protocol.n,
        temperature=protocol.temperature,
        top_k=protocol.top_k,
        top_p=protocol.top_p,
        max_new_tokens=protocol.max_new_tokens,
        seed=seed,
    )

    def flush(wait: bool) -> None:
        while pending and (wait or pending[0][0].done()):
            fut, batch, outs = pending.pop(0)
            recs = [_problem_record(p, comps, g) for (_, p), comps, g in zip(batch, outs, fut.result(), strict=True)]
            append_jsonl(path, recs)
            done.update((r["id"], r) for r in recs)

    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=desc, unit="problem", file=sys.stderr)
    engine = engine_factory() if todo else None
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            convs = [protocol.messages(p.question) for _, p in batch]
            # seeds keyed by problem id: a resumed or re-batched eval draws exactly the same samples
            keys = [f"{spec['benchmark']}/{p.id}" for _, p in batch]
            outs = engine.generate(convs, sampling, lora=adapter, seed_keys=keys, desc=desc)
            if len(outs) != len(batch) or any(len(o) != protocol.n for o in outs):
                got = [len(o) for o in outs]
                raise RuntimeError(f"engine returned {got} completions for {len(batch)} prompts x n={protocol.n}")
            items = [([(c.text, c.finish_reason) for c in comps], p.answer) for (_, p), comps in zip(batch, outs)]
            pending.append((pool.submit(grade_batch, items, protocol.grading), batch, outs))
            flush(wait=False)  # write whatever the graders finished; never wait here
            bar.update(len(batch))
    finally:
        flush(wait=True)  # also on interruption: generated batches are graded and kept for the resume
        bar.close()
    return [done[i] for i in ids]


def evaluate(
    model_cfg: ModelConfig,
    engine_cfg: EngineConfig,
    eval_cfg: EvalConfig,
    out_dir: str | Path,
    *,
    adapter: str | Path | None = None,
    label: str | None = None,
    engine: Any = None,
    grading: str = "strict",
) -> dict:
    """Evaluate the base model (or ``adapter`` on it) on ``eval_cfg.benchmarks``; write ``OUT/results.json``.

    Returns the results dict: ``{"version", "label", "adapter", "protocol", "model", "engine", "eval",
    "benchmarks": {name: {"aggregates": {...}, "problems": [every sample with text, verdict, length]}}}``.
    Pass a prebuilt ``engine`` (:mod:`ssb.engines`, e.g. LoRA-enabled vLLM) to reuse one; the caller closes it.
    """
    from ssb.core.data import load_problems

    out_dir = Path(out_dir)
    adapter = str(adapter) if adapter is not None else None
    label = label or ("base" if adapter is None else Path(adapter).name)
    protocol = resolve_protocol(eval_cfg, grading)
    holder: dict[str, Any] = {"engine": engine}

    def engine_factory():  # built only if something is left to generate (a finished eval resumes for free)
        if holder["engine"] is None:
            from ssb.engines import make_engine

            holder["engine"] = holder["owned"] = make_engine(model_cfg, engine_cfg, adapter=adapter)
        return holder["engine"]

    results: dict = {
        "version": RESULTS_VERSION,
        "label": label,
        "adapter": adapter,
        "protocol": dataclasses.asdict(protocol),
        "model": config_to_dict(model_cfg),
        "engine": config_to_dict(engine_cfg),
        "eval": config_to_dict(eval_cfg),
        "benchmarks": {},
    }
    specs: list[dict] = []
    pool = make_grader_pool(eval_cfg.grader_workers)
    try:
        for bench in eval_cfg.benchmarks:
            problems = load_problems(bench, limit=eval_cfg.limit, map_hint=None)
            spec = _spec(protocol, model_cfg, engine_cfg, adapter, bench)
            specs.append(spec)
            records = evaluate_problems(
                engine_factory,
                problems,
                protocol,
                spec,
                out_dir / "partial",
                adapter=adapter,
                batch_size=max(1, engine_cfg.batch_size),
                seed=eval_cfg.seed,
                pool=pool,
                desc=f"eval {label} {bench}",
            )
            aggregates = aggregate(records, n_boot=eval_cfg.bootstrap, seed=eval_cfg.seed)
            results["benchmarks"][bench] = {"aggregates": aggregates, "problems": records}
    finally:
        pool.shutdown(wait=True)
        if holder.get("owned") is not None:
            holder["owned"].close()
    settings = {k: v for k, v in config_to_dict(eval_cfg).items() if k != "grader_workers"}
    results["fingerprint"] = sha256_text(json.dumps([specs, settings], sort_keys=True))[:16]
    _set_aside_other_results(out_dir, results["fingerprint"])
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", markdown_table([results]))
    return results


def _set_aside_other_results(out_dir: Path, fingerprint: str) -> None:
    """A results.json of other settings (or unreadable) is moved aside with its results.md, never overwritten."""
    path = out_dir / "results.json"
    old = read_json(path)
    if path.exists() and (old is None or old.get("fingerprint") != fingerprint):
        moved = move_aside(out_dir, [n for n in (path.name, "results.md") if (out_dir / n).exists()])
        print(f"ssb eval: {path} was made from other settings, moved to {moved}", file=sys.stderr)
