"""``ssb curate`` with ``distill.source=on_policy``: the student's own rollouts, to be scored by the hinted teacher.

SSB distils the teacher's robust solution; on-policy self-distillation (OPSD; Lightning OPD) distils the
student's *own* samples instead, each scored once, by prefill, under the same hinted teacher view. For every
problem whose rollouts have both outcomes, every sample that stopped by itself becomes one sequence:

- student view: the bare question, then the sample as the reply (what the student will be trained on);
- teacher view: the hinted prompt of ``ssb.curate`` (the problem, a correct rollout, a rollout of the most
  common wrong answer), then the same sample as the reply.

The hint never contains the sample it scores: the correct hint is another correct rollout and the wrong hint
another wrong one (the most common wrong answer's other members first, then the next most common answer). A
sample with no such other rollout is skipped and counted, as are truncated samples. Choices come from an RNG
seeded by ``(curate.seed, problem id, sample)`` and are recorded per sequence.

Outputs are ``ssb.curate``'s (``RUN_DIR/curate/{teacher,student}.jsonl``, ``curation_stats.json``), so capture
and train run unchanged; each record carries ``source: on_policy``, its ``sample`` and its hint. Nothing is
generated here, so the stage takes seconds; the rollouts are the student's (round ``r`` of ``rounds=R``
samples from the round ``r-1`` student).
"""

from __future__ import annotations

import random
import sys

from ssb.config import SSBConfig, config_hash, save_config
from ssb.core.files import atomic_write_json, atomic_write_jsonl, claim_dir, sha256_file
from ssb.core.layout import RunLayout
from ssb.core.prompts import student_messages, teacher_messages, template
from ssb.core.rollouts import read_rollouts, wrong_answer_groups
from ssb.engines import derive_seed

# per problem: scored (>= 1 sequence), no_correct / no_wrong (no hint possible), not_reached (over the cap)
STATUSES = ("kept", "no_correct", "no_wrong", "no_hint", "not_reached")
# per sample of a problem with both outcomes
SAMPLE_COUNTS = ("scored", "truncated", "no_other_correct", "no_other_wrong", "over_cap")


def choose_hint(
    sample: dict, done: list[dict], groups: list[list[dict]], rng: random.Random
) -> tuple[str, dict | None]:
    """A (correct, wrong) pair of rollouts from ``done`` (finished samples of one problem), neither ``sample``.

    ``groups`` are the problem's wrong answers (:func:`ssb.core.rollouts.wrong_answer_groups`, counting the sample
    too); the wrong rollout comes from the most common one that has a member other than ``sample`` (ties:
    ``rng``). Returns ("ok", hint) or ("no_other_correct" | "no_other_wrong", None)."""
    correct = [r for r in done if r["correct"] and r["sample"] != sample["sample"]]
    if not correct:
        return "no_other_correct", None
    for size in sorted({len(g) for g in groups}, reverse=True):
        tied = [g for g in groups if len(g) == size]
        rng.shuffle(tied)
        for g in tied:
            usable = [r for r in g if r["sample"] != sample["sample"]]
            if usable:
                wrong = rng.choice(usable)
                right = rng.choice(correct)
                return "ok", {
                    "correct_sample": right["sample"],
                    "wrong_sample": wrong["sample"],
                    "wrong_answer": wrong["answer"],
                    "wrong_count": len(g),
                    "correct_text": right["text"],
                    "wrong_text": wrong["text"],
                }
    return "no_other_wrong", None


def select_sequences(cfg: SSBConfig) -> tuple[list[dict], dict]:
    """(sequences, stats): every scorable sample of the mixed problems, in problem then sample order."""
    problems, by_id = read_rollouts(RunLayout(cfg.run_dir))
    cap = cfg.distill.max_sequences or None
    status = {}
    counts = dict.fromkeys(SAMPLE_COUNTS, 0)
    seqs: list[dict] = []
    mixed = 0
    for p in problems:
        rolls = sorted(by_id[p["id"]], key=lambda r: r["sample"])
        done = [r for r in rolls if r["finish_reason"] == "stop"]
        if not any(r["correct"] for r in done):
            status[p["id"]] = "no_correct"
            continue
        groups = wrong_answer_groups(done)  # once per problem: clustering may call math-verify
        if not groups:
            status[p["id"]] = "no_wrong"
            continue
        mixed += 1
        counts["truncated"] += len(rolls) - len(done)
        n_before = len(seqs)
        for r in done:
            if cap is not None and len(seqs) >= cap:
                counts["over_cap"] += 1
                continue
            rng = random.Random(derive_seed(cfg.curate.seed, p["id"], r["sample"]))
            verdict, hint = choose_hint(r, done, groups, rng)
            if hint is None:
                counts[verdict] += 1
                continue
            counts["scored"] += 1
            seqs.append({"problem": p, "sample": r, "hint": hint})
        got = len(seqs) - n_before
        status[p["id"]] = "kept" if got else ("not_reached" if cap is not None and len(seqs) >= cap else "no_hint")
    stats = {
        "source": "on_policy",
        "problems": len(problems),
        "pairs": len(seqs),  # sequences to distil (the key downstream readers share with robust curation)
        "sequences": len(seqs),
        "target_pairs": cap,
        "stop_reason": "cap_reached" if cap is not None and counts["over_cap"] else "dataset_exhausted",
        "candidates": mixed,
        "generated": 0,
        "status_counts": {s: sum(v == s for v in status.values()) for s in STATUSES},
        "sample_counts": counts,
        "hinted_attempts": {"total": 0, "kept": 0},  # the hinted teacher generates nothing on-policy
    }
    return seqs, stats


def run(cfg: SSBConfig, *, resume: bool = True) -> int:
    """Write the on-policy sequences as curate's teacher/student views (``resume`` is accepted: the stage is
    a pure function of the rollouts and is simply redone)."""
    layout = RunLayout(cfg.run_dir)
    seqs, stats = select_sequences(cfg)
    state = {
        "source": "on_policy",
        "curate": config_hash(cfg.curate),
        "distill": config_hash(cfg.distill),
        "rollouts": sha256_file(layout.rollouts)[:16],
    }
    outputs = [layout.curate_teacher.name, layout.curate_student.name, layout.curate_stats.name]
    claim_dir(layout.curate, state, outputs, tag="ssb curate")  # robust curation's pairs are moved aside, not lost
    save_config(cfg, layout.curate)
    teacher, student, hinted = [], [], template(cfg.curate.template)
    for s in seqs:
        p, r, hint = s["problem"], s["sample"], s["hint"]
        reply = {"role": "assistant", "content": r["text"]}
        meta = {
            "id": p["id"],
            "answer": p["answer"],
            "source": "on_policy",
            "sample": r["sample"],
            "correct": r["correct"],
            **{k: v for k, v in hint.items() if not k.endswith("_text")},
        }
        t_conv = teacher_messages(p["question"], hint["correct_text"], hint["wrong_text"], hinted)
        teacher.append({**meta, "messages": [*t_conv, reply]})
        student.append({**meta, "messages": [*student_messages(p["question"]), reply]})
    atomic_write_jsonl(layout.curate_teacher, teacher)
    atomic_write_jsonl(layout.curate_student, student)
    atomic_write_json(layout.curate_stats, stats)
    print(
        f"[ssb curate] on-policy: {stats['sequences']} sequences from {stats['candidates']} problems with both "
        f"outcomes (of {stats['problems']}); samples: {stats['sample_counts']} -> {layout.curate}",
        file=sys.stderr,
    )
    return 0
