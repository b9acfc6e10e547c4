"""``ssb capture``: run the teacher view once and store its sparse top-k log-probs (docs/SPEC.md section 5).

For every curated example the teacher sequence is ``chat_template([system, hinted user], generation prompt)``
followed by ``reply_ids(reply)`` (ending with end-of-turn); the R rows are the positions that predict the reply
tokens (:mod:`ssb.capture.inputs`). The student view (``ssb.store.build_student_examples``) reuses the very same
reply ids.

Backends: ``hf`` (:mod:`ssb.capture.hf`) runs the base model to its final hidden states only and streams the LM
head through ``ssb_kernels.topk_logprobs`` (never an (N, V) logits tensor), batched by a token budget, or stores the
hidden states themselves (``capture.store_format: hidden``, the exact teacher: :mod:`ssb.store.hidden`); ``vllm``
(:mod:`ssb.capture.vllm`) asks for ``prompt_logprobs=k``, which gives exact values at T = 1 but no ``c_T`` for
T != 1.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ssb.capture.inputs import Item, distilled_sequences, load_items
from ssb.capture.ranks import Ranks
from ssb.config import ConfigError, SSBConfig, config_to_dict, save_config
from ssb.core.files import move_aside, sha256_file, sha256_text, weights_stamp
from ssb.core.layout import RunLayout
from ssb.core.models import check_model_source, load_tokenizer
from ssb.core.prompts import template
from ssb.store import StoreCheck, StoreWriter, TeacherStore, chat_template_hash, check_store, tokenizer_hash
from ssb.store.format import shard_name

__all__ = ["CapturePlan", "Item", "capture", "make_backend", "plan_capture", "run", "write_store"]


def max_length(cfg: SSBConfig) -> int:
    if cfg.engine.max_model_len:
        return int(cfg.engine.max_model_len)
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(check_model_source(cfg.model.name_or_path), revision=cfg.model.revision)
    return int(getattr(mc, "max_position_embeddings", 1 << 30))


def make_backend(cfg: SSBConfig):
    if cfg.capture.backend == "hf":
        from ssb.capture.hf import HFCapture

        return HFCapture(cfg)
    if cfg.capture.backend == "vllm":
        from ssb.capture.vllm import VLLMCapture

        return VLLMCapture(cfg)
    raise AssertionError(f"capture.backend={cfg.capture.backend!r} passed the config's choices")  # checked at load


@dataclass(frozen=True)
class CapturePlan:
    """Everything decided before the model loads: tokenised items, skips, and the store's fingerprint."""

    items: list[Item]
    skipped: list[dict]
    n_inputs: int
    inputs: dict
    tokenizer: dict
    fingerprint: str


def plan_capture(cfg: SSBConfig, teacher_jsonl: str | Path, student_jsonl: str | Path) -> CapturePlan:
    m = cfg.model
    tok = load_tokenizer(m)
    items, skipped, n_inputs = load_items(teacher_jsonl, student_jsonl, tok, max_length(cfg))
    prompts = template(cfg.curate.template).digest()  # teacher_sha256 already covers the rendered prompts
    settings = {"model": config_to_dict(m), "capture": config_to_dict(cfg.capture), "prompts": prompts}
    settings["weights"] = weights_stamp(m.name_or_path)  # a local model rewritten in place is captured afresh
    inputs = {
        "teacher_jsonl": str(teacher_jsonl),
        "teacher_sha256": sha256_file(teacher_jsonl),
        "student_jsonl": str(student_jsonl),
        "student_sha256": sha256_file(student_jsonl),
    }
    tok_info = {"hash": tokenizer_hash(tok), "chat_template": chat_template_hash(tok), "size": len(tok)}
    contents = [inputs["teacher_sha256"], inputs["student_sha256"]]  # not the paths: a moved run dir stays valid
    fingerprint = sha256_text(json.dumps([settings, contents, tok_info], sort_keys=True))[:16]
    return CapturePlan(items, skipped, n_inputs, inputs, tok_info, fingerprint)


def teacher_identity(cfg: SSBConfig, tokenizer: dict) -> dict:
    """What makes two stores' targets come from the same teacher: the model (id, revision, weight files), the
    hinted template and the chat template. Train refuses to mix stores that differ here, unless
    ``distill.allow_teacher_mix``."""
    m, hinted = cfg.model, template(cfg.curate.template).digest()
    return {
        "model": m.name_or_path,
        "revision": m.revision,
        "weights": weights_stamp(m.name_or_path),
        "template": hinted,
        "chat_template": tokenizer["chat_template"],
    }


def capture(
    cfg: SSBConfig,
    teacher_jsonl: str | Path,
    student_jsonl: str | Path,
    out_dir: str | Path,
    *,
    backend=None,
    ranks: Ranks | None = None,
) -> dict:
    """Capture every curated example into the store at ``out_dir`` (resuming, repairing); returns the manifest.

    Inputs and then the model are validated before the store directory is touched (the settings were, at config
    load: ``ssb.core.config_rules``). A complete store
    of these inputs and settings is verified shard by shard (sha256): bad or missing shards are captured again,
    the rest kept. Files made under other settings are moved aside (``<out_dir>.stale-<time>/``), never deleted.

    ``backend``: an object with ``name``, ``vocab_size``, ``exact_temperatures`` and ``capture(items, k)``
    (default: the one ``capture.backend`` names, built only when some shard is still missing).
    ``ranks``: this process's rank under torchrun (default: from the environment, :mod:`ssb.capture.ranks`);
    each rank captures its own shards, rank 0 moves files aside and writes the manifest.
    """
    out_dir = Path(out_dir)
    ranks = Ranks.from_env() if ranks is None else ranks
    if ranks.world > 1 and cfg.capture.backend != "hf" and backend is None:
        raise ConfigError(
            f"capture.backend={cfg.capture.backend}: only the hf backend captures sharded under torchrun; run "
            "ssb capture as one process (vLLM spans GPUs by engine.tensor_parallel_size)"
        )
    plan = plan_capture(cfg, teacher_jsonl, student_jsonl)
    n_shards = max(1, math.ceil(plan.n_inputs / cfg.capture.shard_examples))
    state = check_store(out_dir, plan.fingerprint, n_shards)  # every rank reads the same directory
    if state.complete:
        if ranks.is_main:
            print(
                f"[capture] {out_dir}: complete and up to date (every shard verified), nothing to do", file=sys.stderr
            )
        return TeacherStore(out_dir, verify=False).manifest
    own_backend = backend is None
    ranks.start()
    try:
        backend = make_backend(cfg) if own_backend else backend  # the model loads: the last input to validate
        ranks.barrier()  # every rank has read the store (and loaded its model) before anything on disk moves
        if ranks.is_main:
            _set_aside(state)
            if ranks.world > 1 and n_shards < ranks.world:
                print(
                    f"[capture] {n_shards} shard(s) for {ranks.world} ranks: lower capture.shard_examples "
                    f"({cfg.capture.shard_examples}) so that every rank has work",
                    file=sys.stderr,
                )
        ranks.barrier()
        return write_store(cfg, plan, out_dir, backend, todo=sorted(state.todo), ranks=ranks)
    finally:
        if own_backend and hasattr(backend, "close"):
            backend.close()
        ranks.stop()


def _set_aside(state: StoreCheck) -> None:
    """Move the files made under other settings out of the way and say what will be captured again, and why."""
    if state.foreign:
        moved = move_aside(state.path, None if state.whole_dir_foreign else state.foreign)
        what = "the store" if state.whole_dir_foreign else f"{len(state.foreign)} file(s)"
        print(f"[capture] {state.path}: {what} made from other inputs/settings, moved to {moved}", file=sys.stderr)
    for j, why in sorted(state.todo.items()):
        if why and shard_name(j) not in state.foreign:
            print(f"[capture] {state.path / shard_name(j)}: {why}; recapturing it", file=sys.stderr)


def write_store(
    cfg: SSBConfig, plan: CapturePlan, out_dir: Path, backend, todo: list[int] | None = None, ranks: Ranks | None = None
) -> dict:
    """Capture the shards ``todo`` of ``plan`` (default: all) that are this rank's, keep the others on disk; once
    every rank is done, rank 0 writes the manifest from the shards on disk. Returns the manifest."""
    m, cap = cfg.model, cfg.capture
    ranks = Ranks() if ranks is None else ranks
    n_shards = max(1, math.ceil(plan.n_inputs / cap.shard_examples))
    todo = list(range(n_shards)) if todo is None else todo
    pending = ranks.mine(todo)
    k = min(cap.k, backend.vocab_size)
    header = {
        "fingerprint": plan.fingerprint,
        "model": {"id": m.name_or_path, "revision": m.revision, "dtype": m.dtype, "vocab_size": backend.vocab_size},
        "tokenizer": plan.tokenizer,
        "prompts": {"digest": template(cfg.curate.template).digest(), "template": cfg.curate.template},
        "teacher": teacher_identity(cfg, plan.tokenizer),
        "distilled": distilled_sequences(plan.inputs["teacher_jsonl"]),
        "backend": backend.name,
        "kernel_impl": cap.kernel_impl,
        "temperatures": [float(t) for t in cap.temperatures],
        "exact_temperatures": backend.exact_temperatures,
        "inputs": plan.inputs,
        "input_examples": plan.n_inputs,
    }
    if cap.store_format == "hidden":  # exact at every temperature; the head it is exact for (ssb.store.hidden)
        header["hidden"] = backend.hidden_info()
        header["exact_temperatures"] = header["temperatures"]
    writer = StoreWriter(
        out_dir,
        header,
        k=k,
        value_dtype=cap.value_dtype,
        temperatures=backend.exact_temperatures,
        store_format=cap.store_format,
    )
    ranks.barrier()  # every writer has dropped the stale temp files before any rank writes a new one
    if len(todo) < n_shards and ranks.is_main:
        print(
            f"[capture] {n_shards - len(todo)}/{n_shards} shards already complete, capturing {len(todo)}",
            file=sys.stderr,
        )
    t0, n_tok = time.perf_counter(), 0
    desc = "capture" if ranks.world == 1 else f"capture rank {ranks.rank}"
    bar = tqdm(pending, desc=desc, unit="shard", file=sys.stderr)
    for j in bar:
        lo, hi = j * cap.shard_examples, (j + 1) * cap.shard_examples
        batch = [it for it in plan.items if lo <= it.example_index < hi]
        examples = backend.capture(batch, k) if batch else []
        writer.write_shard(j, examples, [s for s in plan.skipped if lo <= s["example_index"] < hi])
        n_tok += sum(len(it.prompt) + len(it.reply) - 1 for it in batch)
        bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    ranks.barrier()  # every rank's shards are on disk
    if ranks.is_main:
        manifest = writer.finish(n_shards)
    ranks.barrier()  # the manifest is on disk
    if not ranks.is_main:
        manifest = TeacherStore(out_dir, verify=False).manifest
    if plan.skipped and ranks.is_main:
        print(f"[capture] skipped {len(plan.skipped)} of {plan.n_inputs} examples (reasons in {out_dir}/manifest.json)")
    return manifest


def run(cfg: SSBConfig) -> int:
    """``ssb capture``: RUN_DIR/curate/{teacher,student}.jsonl -> RUN_DIR/capture/ (sharded under torchrun)."""
    layout = RunLayout(cfg.run_dir)
    manifest = capture(cfg, layout.curate_teacher, layout.curate_student, layout.store)
    if not Ranks.from_env().is_main:  # under torchrun: rank 0 speaks for the store
        return 0
    save_config(cfg, layout.store)
    c = manifest["counts"]
    print(
        f"[capture] {layout.store}: {c['examples']} examples, {c['rows']} rows, {c['skipped']} skipped", file=sys.stderr
    )
    return 0
