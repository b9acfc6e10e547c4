"""``ssb capture``: run the teacher view once and store its sparse top-k log-probs (docs/SPEC.md section 5).

For every curated example the teacher sequence is ``chat_template([system, hinted user], generation prompt)``
followed by ``reply_ids(reply)`` (ending with end-of-turn); the R rows are the positions that predict the reply
tokens. The student view (``ssb.store.build_student_examples``) reuses the very same reply ids.

Backends: ``hf`` runs the base model to its final hidden states only and streams the LM head through
``ssb_kernels.topk_logprobs`` (never an (N, V) logits tensor), batched by a token budget; ``vllm`` asks for
``prompt_logprobs=k`` (``ssb.teacher_vllm``), which gives exact values at T = 1 but no ``c_T`` for T != 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ssb.config import SSBConfig, config_to_dict, save_config
from ssb.files import InputError, iter_jsonl, sha256_file, sha256_text, weights_stamp
from ssb.prompts import DEFAULT_PROMPTS, prompt_ids, reply_ids
from ssb.store import (
    StoreExample,
    StoreWriter,
    TeacherStore,
    chat_template_hash,
    is_complete,
    store_dir,
    summarize,
    tokenizer_hash,
)
from ssb.train_model import resolve_dtype


@dataclass(frozen=True)
class Item:
    """One teacher sequence to capture: ``prompt`` (P teacher prompt ids) + ``reply`` (R ids, end-of-turn last)."""

    example_index: int
    id: str
    prompt: list[int]
    reply: list[int]


# --------------------------------------------------------------------------------------------------
# Inputs


def _messages(path: Path, line: int, rec: dict) -> list[dict]:
    msgs = rec.get("messages")
    ok = isinstance(msgs, list) and len(msgs) >= 2 and all(isinstance(m, dict) and "content" in m for m in msgs)
    if not ok or msgs[-1].get("role") != "assistant":
        raise InputError(f"{path}:{line}: messages: expected [system, user, assistant] with contents")
    return msgs


def load_items(
    teacher_jsonl: str | Path, student_jsonl: str | Path, tokenizer, max_len: int
) -> tuple[list[Item], list[dict], int]:
    """Tokenise the curated pairs; returns (items, skipped records with reasons, number of input examples).

    Line i of both files must be the same example (same id, identical assistant reply), else InputError.
    """
    teacher_jsonl, student_jsonl = Path(teacher_jsonl), Path(student_jsonl)
    teacher = list(iter_jsonl(teacher_jsonl))
    student = list(iter_jsonl(student_jsonl))
    if len(teacher) != len(student):
        raise InputError(f"{teacher_jsonl}: {len(teacher)} examples but {student_jsonl} has {len(student)}")
    items, skipped = [], []
    for i, ((tline, trec), (sline, srec)) in enumerate(zip(teacher, student)):
        tmsgs, smsgs = _messages(teacher_jsonl, tline, trec), _messages(student_jsonl, sline, srec)
        if trec.get("id") != srec.get("id"):
            raise InputError(f"{student_jsonl}:{sline}: id {srec.get('id')!r} != {trec.get('id')!r} in {teacher_jsonl}")
        reply = tmsgs[-1]["content"]
        if smsgs[-1]["content"] != reply:
            raise InputError(f"{student_jsonl}:{sline}: the assistant reply differs from {teacher_jsonl}:{tline}")
        ex_id = str(trec.get("id", i))
        if not reply.strip():
            skipped.append({"example_index": i, "id": ex_id, "reason": "empty reply"})
            continue
        p, r = prompt_ids(tokenizer, tmsgs[:-1]), reply_ids(tokenizer, reply)
        if len(p) + len(r) - 1 > max_len:
            reason = f"teacher sequence of {len(p) + len(r) - 1} tokens exceeds max length {max_len}"
            skipped.append({"example_index": i, "id": ex_id, "reason": reason})
            continue
        items.append(Item(i, ex_id, p, r))
    return items, skipped, len(teacher)


def pack_by_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Group indices (longest first) so each group's ``count * max_length`` stays within ``budget`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])  # a sequence longer than the budget runs alone
    return groups


# --------------------------------------------------------------------------------------------------
# HF backend


class HFCapture:
    """Teacher forward with transformers: base model -> final hidden states -> streamed top-k over the LM head."""

    name = "hf"

    def __init__(self, cfg: SSBConfig, *, model=None):
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            m = cfg.model
            model = AutoModelForCausalLM.from_pretrained(
                m.name_or_path, revision=m.revision, dtype=resolve_dtype(m.dtype, self.device),
                trust_remote_code=m.trust_remote_code,
            )  # fmt: skip
        self.model = model.to(self.device).eval()
        self.body = model.base_model  # the decoder stack incl. the final norm, without the LM head
        self.head = model.get_output_embeddings().weight  # (V, H); tied to the input embedding in Qwen2.5-3B
        self.vocab_size = int(self.head.shape[0])
        self.cap = cfg.capture
        self.temperatures = tuple(float(t) for t in cfg.capture.temperatures)
        self.exact_temperatures = sorted(set(self.temperatures) | {1.0})

    @torch.no_grad()
    def capture(self, items: list[Item], k: int) -> list[StoreExample]:
        """Capture ``items``; returns one StoreExample per item in the same order."""
        from ssb_kernels import topk_logprobs

        lengths = [len(it.prompt) + len(it.reply) - 1 for it in items]
        out: list[StoreExample | None] = [None] * len(items)
        temps = self.exact_temperatures
        for group in pack_by_budget(lengths, self.cap.token_budget):
            L = max(lengths[i] for i in group)
            ids = torch.zeros(len(group), L, dtype=torch.long)  # right padding: real positions are unaffected
            mask = torch.zeros(len(group), L, dtype=torch.long)
            for b, i in enumerate(group):
                seq = items[i].prompt + items[i].reply[:-1]
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
            hidden = self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            # rows predicting reply tokens: positions P-1 .. P+R-2 of each sequence -> (N, H)
            rows = torch.cat([hidden[b, len(items[i].prompt) - 1 : lengths[i]] for b, i in enumerate(group)])
            targets = torch.cat([torch.tensor(items[i].reply) for i in group]).to(self.device)
            # ids (N, k) sorted by descending log-prob, top_lp (N, k), lse (N, len(temps)): c_T per temperature
            top_ids, top_lp, lse = topk_logprobs(rows, self.head, k, temperatures=temps, impl=self.cap.kernel_impl)
            tok_lp = token_logprob(rows, self.head, targets, top_ids, top_lp)
            start = 0
            for i in group:
                a, b = start, start + len(items[i].reply)
                start = b
                out[i] = StoreExample(
                    example_index=items[i].example_index,
                    token_ids=targets[a:b].int().cpu(),
                    topk_ids=top_ids[a:b].int().cpu(),
                    topk_logprobs=top_lp[a:b].float().cpu(),
                    lse={t: lse[a:b, c].float().cpu() for c, t in enumerate(temps) if t != 1.0},
                    token_logprob=tok_lp[a:b].cpu(),
                )
        return out  # type: ignore[return-value]


def token_logprob(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor
) -> torch.Tensor:
    """Full-vocab log-prob of each target token without full logits: ``z_t - LSE(z) = z_t - z_top1 + l_top1``.

    Shape: hidden (N, H), weight (V, H), targets (N,), top_ids (N, k), top_lp (N, k) -> (N,) float32
    """
    h = hidden.float()
    z_t = (h * weight[targets].float()).sum(-1)
    z_1 = (h * weight[top_ids[:, 0].long()].float()).sum(-1)
    lp = z_t - z_1 + top_lp[:, 0].float()
    hit = top_ids.long() == targets.long().unsqueeze(-1)  # inside the top-k: take the kernel's value verbatim
    return torch.where(hit.any(-1), (top_lp.float() * hit).sum(-1), lp)


# --------------------------------------------------------------------------------------------------
# The stage


def max_length(cfg: SSBConfig) -> int:
    if cfg.engine.max_model_len:
        return int(cfg.engine.max_model_len)
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision)
    return int(getattr(mc, "max_position_embeddings", 1 << 30))


def make_backend(cfg: SSBConfig):
    if cfg.capture.backend == "hf":
        return HFCapture(cfg)
    if cfg.capture.backend == "vllm":
        from ssb.teacher_vllm import VLLMCapture

        return VLLMCapture(cfg)
    raise ValueError(f"capture.backend: expected hf or vllm, got {cfg.capture.backend!r}")


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
    from transformers import AutoTokenizer

    m = cfg.model
    tok = AutoTokenizer.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    items, skipped, n_inputs = load_items(teacher_jsonl, student_jsonl, tok, max_length(cfg))
    settings = {"model": config_to_dict(m), "capture": config_to_dict(cfg.capture), "prompts": DEFAULT_PROMPTS.digest()}
    settings["weights"] = weights_stamp(m.name_or_path)  # a local model rewritten in place is captured afresh
    inputs = {"teacher_jsonl": str(teacher_jsonl), "teacher_sha256": sha256_file(teacher_jsonl),
              "student_jsonl": str(student_jsonl), "student_sha256": sha256_file(student_jsonl)}  # fmt: skip
    tok_info = {"hash": tokenizer_hash(tok), "chat_template": chat_template_hash(tok), "size": len(tok)}
    contents = [inputs["teacher_sha256"], inputs["student_sha256"]]  # not the paths: a moved run dir stays valid
    fingerprint = sha256_text(json.dumps([settings, contents, tok_info], sort_keys=True))[:16]
    return CapturePlan(items, skipped, n_inputs, inputs, tok_info, fingerprint)


def capture(
    cfg: SSBConfig, teacher_jsonl: str | Path, student_jsonl: str | Path, out_dir: str | Path, *, backend=None
) -> dict:
    """Capture every curated example into the store at ``out_dir`` (resuming); returns the manifest.

    ``backend``: an object with ``name``, ``vocab_size``, ``exact_temperatures`` and ``capture(items, k)``
    (default: the one ``capture.backend`` names, built only when some shard is still missing).
    """
    out_dir = Path(out_dir)
    plan = plan_capture(cfg, teacher_jsonl, student_jsonl)
    if is_complete(out_dir, plan.fingerprint):
        print(f"[capture] {out_dir}: complete and up to date, nothing to do", file=sys.stderr)
        return TeacherStore(out_dir, verify=False).manifest
    own_backend = backend is None
    backend = make_backend(cfg) if own_backend else backend
    try:
        return write_store(cfg, plan, out_dir, backend)
    finally:
        if own_backend and hasattr(backend, "close"):
            backend.close()


def write_store(cfg: SSBConfig, plan: CapturePlan, out_dir: Path, backend) -> dict:
    """Capture the shards of ``plan`` that are not on disk yet, then write the manifest."""
    m, cap = cfg.model, cfg.capture
    n_shards = max(1, math.ceil(plan.n_inputs / cap.shard_examples))
    k = min(cap.k, backend.vocab_size)
    header = {
        "fingerprint": plan.fingerprint,
        "model": {"id": m.name_or_path, "revision": m.revision, "dtype": m.dtype, "vocab_size": backend.vocab_size},
        "tokenizer": plan.tokenizer,
        "prompts": {"digest": DEFAULT_PROMPTS.digest()},
        "backend": backend.name,
        "kernel_impl": cap.kernel_impl,
        "temperatures": [float(t) for t in cap.temperatures],
        "exact_temperatures": backend.exact_temperatures,
        "inputs": plan.inputs,
        "input_examples": plan.n_inputs,
    }
    writer = StoreWriter(out_dir, header, k=k, value_dtype=cap.value_dtype, temperatures=backend.exact_temperatures)
    pending = [j for j in range(n_shards) if not writer.done(j)]  # after stale shards were dropped
    if len(pending) < n_shards:
        print(f"[capture] resuming: {n_shards - len(pending)}/{n_shards} shards already complete", file=sys.stderr)
    t0, n_tok = time.perf_counter(), 0
    bar = tqdm(pending, desc="capture", unit="shard", file=sys.stderr)
    for j in bar:
        lo, hi = j * cap.shard_examples, (j + 1) * cap.shard_examples
        batch = [it for it in plan.items if lo <= it.example_index < hi]
        examples = backend.capture(batch, k) if batch else []
        writer.write_shard(j, examples, [s for s in plan.skipped if lo <= s["example_index"] < hi])
        n_tok += sum(len(it.prompt) + len(it.reply) - 1 for it in batch)
        bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.0f}")
    manifest = writer.finish(n_shards)
    if plan.skipped:
        print(f"[capture] skipped {len(plan.skipped)} of {plan.n_inputs} examples (reasons in {out_dir}/manifest.json)")
    return manifest


def print_inspect(path: str | Path) -> None:
    s = summarize(TeacherStore(path))
    print(f"teacher store {s['path']}  ({s['backend']} backend, model {s['model']})")
    print(f"  examples {s['examples']}  rows {s['rows']}  skipped {s['skipped']}")
    print(f"  k {s['k']}  values {s['value_dtype']}  exact c_T for T in {s['exact_temperatures']}")
    print(f"  bytes/row {s['bytes_per_row']:.1f}  (dense float32: {s['dense_fp32_bytes_per_row']}, "
          f"ratio {s['ratio_to_dense']:.2e})")  # fmt: skip
    print(f"  mean teacher mass in top-k {s['mean_topk_mass']:.4f}")
    print(f"  reply tokens inside the top-k {100 * s['reply_token_in_topk']:.2f}%")


def run_stage(cfg: SSBConfig, args: argparse.Namespace) -> int:
    """``ssb capture``: RUN_DIR/curate/{teacher,student}.jsonl -> RUN_DIR/capture/ (or ``--inspect DIR``)."""
    if getattr(args, "inspect", None):
        print_inspect(args.inspect)
        return 0
    run_dir = Path(cfg.run_dir)
    out = store_dir(run_dir)
    manifest = capture(cfg, run_dir / "curate" / "teacher.jsonl", run_dir / "curate" / "student.jsonl", out)
    save_config(cfg, out)
    c = manifest["counts"]
    print(f"[capture] {out}: {c['examples']} examples, {c['rows']} rows, {c['skipped']} skipped", file=sys.stderr)
    return 0
