"""``ssb eval``: a base model or a LoRA adapter on MATH500 / AIME2024 / GSM8K / toy / any JSONL, with named protocols.

A protocol (system prompt, user template, sampling, samples per problem) is a named preset saved in full into
every ``results.json``, so two numbers are only compared when their protocols match. Per benchmark the stage
generates in batches through :func:`ssb.rollout.make_engine` (vLLM with ``LoRARequest`` or HF + ``PeftModel``),
grades each finished batch in a process pool while the next batch generates (math-verify's timeouts use
``SIGALRM``, which only works in a process's main thread, hence processes), and appends graded problems to
``OUT/partial/<benchmark>.jsonl``, so an interrupted eval resumes where it stopped. Metrics live in
:mod:`ssb.eval_stats`, tables and the chart in :mod:`ssb.eval_report`.

Layout of ``OUT`` (default ``RUN_DIR/eval``): ``<label>/results.json`` and ``<label>/partial/`` per evaluated
model, plus ``report.md`` (tables, paired test) and ``chart.png`` (pass@1 with 95% CIs) over all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssb.config import EngineConfig, EvalConfig, ModelConfig, SSBConfig, config_to_dict
from ssb.eval_report import markdown_table, plot_runs, print_compare, write_report
from ssb.eval_stats import aggregate, compare, load_results
from ssb.files import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, sha256_file, weights_stamp
from ssb.prompts import SYSTEM_PROMPT

__all__ = ["PROTOCOLS", "Protocol", "compare", "evaluate", "load_results", "resolve_protocol", "run_stage"]
RESULTS_VERSION = 1
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Protocol:
    """Everything that decides what a score means; saved in full with every result."""

    name: str
    system: str | None  # None: no system message
    user_template: str  # "{question}" is replaced by the question (plain replace: LaTeX braces stay as they are)
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    n: int  # samples per problem
    max_new_tokens: int
    source: str  # where the preset comes from

    def messages(self, question: str) -> list[dict]:
        user = {"role": "user", "content": self.user_template.replace("{question}", question)}
        return ([{"role": "system", "content": self.system}] if self.system is not None else []) + [user]


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "ssb-paper", SYSTEM_PROMPT, "{question}", 0.8, 1.0, 50, 1, 8192,
            "SSB tutor system prompt (ssb.prompts) + bare question, boxed answer; sampling of the reference code's "
            "inference (github.com/purbeshmitra/semantic-soft-bootstrapping logit_gen.py: T=0.8, top_k=50, 8192)",
        ),
        Protocol(
            "qwen-math", BOXED_INSTRUCTION, "{question}", 0.0, 1.0, 0, 1, 2048,
            "Qwen2.5-Math evaluation chat prompt (system = boxed CoT instruction), greedy, 2048 new tokens",
        ),
        Protocol(
            "r1", None, "{question}\n" + BOXED_INSTRUCTION, 0.6, 0.95, 0, 8, 8192,
            "DeepSeek-R1 recommendation (arXiv 2501.12948): no system prompt, instruction in the user turn, "
            "T=0.6, top_p=0.95, pass@1 averaged over n samples; 8192 new tokens here (R1 used 32768)",
        ),
    )
}  # fmt: skip


def resolve_protocol(eval_cfg: EvalConfig) -> Protocol:
    """The named preset with the config's explicit overrides (n, temperature, top_p, max_new_tokens) applied."""
    if eval_cfg.protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol: unknown protocol {eval_cfg.protocol!r} (expected one of {sorted(PROTOCOLS)})")
    changes: dict[str, Any] = {}
    for key in ("n", "temperature", "top_p", "max_new_tokens"):
        if getattr(eval_cfg, key) is not None:
            changes[key] = getattr(eval_cfg, key)
    proto = dataclasses.replace(PROTOCOLS[eval_cfg.protocol], **changes)
    if proto.n < 1 or proto.max_new_tokens < 1:
        raise ValueError(f"eval: n and max_new_tokens must be >= 1, got n={proto.n} max={proto.max_new_tokens}")
    if proto.temperature == 0 and proto.n > 1:
        raise ValueError(f"eval: protocol {proto.name} is greedy (temperature 0); n={proto.n} copies would fake pass@k")
    return proto


# --------------------------------------------------------------------------------------------------
# Grading (runs in worker processes)


def grade_problem(texts: list[str], gold: str) -> list[dict]:
    """Verdict, extracted answer and answer cluster (index of the first equivalent answer) per sample text."""
    from ssb.grading import answers_equal, extract_answer, is_correct

    out: list[dict] = []
    reps: list[int] = []  # first sample of each distinct answer
    for i, text in enumerate(texts):
        pred = extract_answer(text)
        cluster = None
        if pred is not None:
            cluster = next((r for r in reps if out[r]["pred"] == pred or answers_equal(pred, out[r]["pred"])), None)
            if cluster is None:
                reps.append(i)
                cluster = i
        out.append({"pred": pred, "correct": bool(is_correct(text, gold)), "cluster": cluster})
    return out


def grade_batch(items: list[tuple[list[str], str]]) -> list[list[dict]]:
    return [grade_problem(texts, gold) for texts, gold in items]


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
    # spawn, not fork: the parent holds engine threads (vLLM, torch) that a fork would copy half-locked
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


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
        stale = path.with_name(path.stem + ".stale.jsonl")
        path.replace(stale)
        print(f"ssb eval: {path} was made with another protocol/model/adapter; moved to {stale}", file=sys.stderr)
        atomic_write_json(meta_path, spec)
        return {}
    return {rec["id"]: rec for rec in read_jsonl(path, tolerate_partial_tail=True)}


def _problem_record(problem: Any, completions: list, graded: list[dict]) -> dict:
    samples = [
        {"text": c.text, "n_tokens": len(c.token_ids), "finish_reason": c.finish_reason, **g}
        for c, g in zip(completions, graded, strict=True)
    ]
    return {"id": problem.id, "question": problem.question, "answer": problem.answer, "meta": problem.meta,
            "samples": samples}  # fmt: skip


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
    sampling = Sampling(n=protocol.n, temperature=protocol.temperature, top_k=protocol.top_k,
                        top_p=protocol.top_p, max_new_tokens=protocol.max_new_tokens, seed=seed)  # fmt: skip

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
            outs = engine.generate(convs, sampling, lora=adapter, seed_keys=keys)
            if len(outs) != len(batch) or any(len(o) != protocol.n for o in outs):
                got = [len(o) for o in outs]
                raise RuntimeError(f"engine returned {got} completions for {len(batch)} prompts x n={protocol.n}")
            items = [([c.text for c in comps], p.answer) for (_, p), comps in zip(batch, outs)]
            pending.append((pool.submit(grade_batch, items), batch, outs))
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
) -> dict:
    """Evaluate the base model (or ``adapter`` on it) on ``eval_cfg.benchmarks``; write ``OUT/results.json``.

    Returns the results dict: ``{"version", "label", "adapter", "protocol", "model", "engine", "eval",
    "benchmarks": {name: {"aggregates": {...}, "problems": [every sample with text, verdict, length]}}}``.
    Pass a prebuilt ``engine`` (:mod:`ssb.engines`, e.g. LoRA-enabled vLLM) to reuse one; the caller closes it.
    """
    from ssb.data import load_problems

    out_dir = Path(out_dir)
    adapter = str(adapter) if adapter is not None else None
    label = label or ("base" if adapter is None else Path(adapter).name)
    protocol = resolve_protocol(eval_cfg)
    holder: dict[str, Any] = {"engine": engine}

    def engine_factory():  # built only if something is left to generate (a finished eval resumes for free)
        if holder["engine"] is None:
            from ssb.engines import make_engine

            holder["engine"] = holder["owned"] = make_engine(model_cfg, engine_cfg, adapter=adapter)
        return holder["engine"]

    results: dict = {
        "version": RESULTS_VERSION, "label": label, "adapter": adapter, "protocol": dataclasses.asdict(protocol),
        "model": config_to_dict(model_cfg), "engine": config_to_dict(engine_cfg), "eval": config_to_dict(eval_cfg),
        "benchmarks": {},
    }  # fmt: skip
    pool = make_grader_pool(eval_cfg.grader_workers)
    try:
        for bench in eval_cfg.benchmarks:
            problems = load_problems(bench, limit=eval_cfg.limit)
            spec = _spec(protocol, model_cfg, engine_cfg, adapter, bench)
            records = evaluate_problems(
                engine_factory, problems, protocol, spec, out_dir / "partial",
                adapter=adapter, batch_size=max(1, engine_cfg.batch_size), seed=eval_cfg.seed, pool=pool,
                desc=f"eval {label} {bench}",
            )  # fmt: skip
            aggregates = aggregate(records, n_boot=eval_cfg.bootstrap, seed=eval_cfg.seed)
            results["benchmarks"][bench] = {"aggregates": aggregates, "problems": records}
    finally:
        pool.shutdown(wait=True)
        if holder.get("owned") is not None:
            holder["owned"].close()
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", markdown_table([results]))
    return results


# --------------------------------------------------------------------------------------------------
# Stage entry point


def run_stage(cfg: SSBConfig, args: argparse.Namespace) -> int:
    """``ssb eval``: base (and the adapter: ``--adapter``, ``eval.adapter`` or ``RUN_DIR/train/adapter``)."""
    if getattr(args, "compare", None):
        a, b = (load_results(p) for p in args.compare)
        cmp = print_compare(a, b)
        if getattr(args, "out", None):
            atomic_write_json(Path(args.out) / "compare.json", cmp)
            print(f"chart: {plot_runs([a, b], Path(args.out) / 'compare.png')}")
        return 0
    out = Path(getattr(args, "out", None) or Path(cfg.run_dir) / "eval")
    adapter = getattr(args, "adapter", None) or cfg.eval.adapter
    trained = Path(cfg.run_dir) / "train" / "adapter"
    if adapter is None and (trained / "adapter_config.json").exists():
        adapter = str(trained)
    plan = ([("base", None)] if cfg.eval.include_base or adapter is None else []) + (
        [("ssb" if adapter == str(trained) else Path(adapter).name, adapter)] if adapter else []
    )
    if adapter is not None and cfg.train.qlora:
        print("ssb eval: warning: QLoRA adapter evaluated on the base as model.dtype loads it (engines do not "
              "quantise to 4-bit), not on the NF4 base it was trained against", file=sys.stderr)  # fmt: skip
    if cfg.rounds > 1 and adapter is not None and adapter == str(trained):
        return _eval_rounds(cfg, out)
    engine = None
    if adapter is not None and len(plan) > 1:  # one engine serves base and adapter (per-call LoRA)
        from ssb.engines import adapter_rank, make_engine

        engine = make_engine(cfg.model, cfg.engine, enable_lora=True, max_lora_rank=adapter_rank(adapter))
    try:
        runs = [
            evaluate(cfg.model, cfg.engine, cfg.eval, out / label, adapter=ad, label=label, engine=engine)
            for label, ad in plan
        ]
    finally:
        if engine is not None:
            engine.close()
    report, chart = write_report(runs, out)
    print(report.read_text())
    print(f"ssb eval: results in {', '.join(str(out / lb / 'results.json') for lb, _ in plan)}; chart {chart}")
    return 0


def _eval_rounds(cfg: SSBConfig, out: Path) -> int:
    """``rounds=R``: the base and every round's student (merged weights, one engine each), one report."""
    from ssb.rounds import round_students

    models = ([("base", cfg.model)] if cfg.eval.include_base else []) + [
        (label, dataclasses.replace(cfg.model, name_or_path=str(path))) for label, path in round_students(cfg)
    ]
    runs = [evaluate(model, cfg.engine, cfg.eval, out / label, label=label) for label, model in models]
    report, chart = write_report(runs, out)
    print(report.read_text())
    print(f"ssb eval: results per round in {', '.join(str(out / lb / 'results.json') for lb, _ in models)}")
    return 0
