"""The curated pairs as token ids: one teacher sequence (hinted prompt + reply) per example, or why it is skipped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ssb.core.files import InputError, iter_jsonl
from ssb.core.prompts import prompt_ids, reply_ids


@dataclass(frozen=True)
class Item:
    """One teacher sequence to capture: ``prompt`` (P teacher prompt ids) + ``reply`` (R ids, end-of-turn last)."""

    example_index: int
    id: str
    prompt: list[int]
    reply: list[int]


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


def distilled_sequences(teacher_jsonl: str | Path) -> dict:
    """Which sequences the teacher scores, for the store manifest: the source (``robust`` solutions or the
    student's ``on_policy`` samples, as curate recorded it) and one ``id`` (robust) or ``id#sample`` per line."""
    sources, seqs = set(), []
    for _, rec in iter_jsonl(teacher_jsonl):
        src = rec.get("source", "robust")
        sources.add(src)
        seqs.append(f"{rec.get('id')}#{rec['sample']}" if src == "on_policy" else str(rec.get("id")))
    return {"source": "/".join(sorted(sources)) or None, "sequences": seqs}
