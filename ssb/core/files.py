"""Small file helpers every stage shares: atomic writes, line-numbered JSONL reading, hashing, batch resume, and
moving aside (never deleting) the outputs of other settings."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Malformed input; the message names the file and line."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def move_aside(path: str | Path, names: Iterable[str] | None = None) -> Path:
    """Move outputs made under other settings out of the way instead of deleting them: the directory ``path``
    itself (``names=None``), or only the entries ``names`` of it, to a new sibling ``<path>.stale-<time>[-n]/``.
    Returns that directory. Callers do this only after their new inputs validated, so a bad value loses nothing."""
    path = Path(path)
    base = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    if names is None:
        path.rename(target)
        return target
    target.mkdir()
    for name in names:
        (path / name).rename(target / name)
    return target


STATE = "state.json"  # in a stage directory: what the work in it was made with (resume only over the same)


def resumable(out_dir: str | Path, state: dict, resume: bool = True) -> bool:
    """Whether ``resume`` is on and ``out_dir/state.json`` records exactly ``state`` (the work there may go on)."""
    return resume and read_json(Path(out_dir) / STATE) == state


def claim_dir(out_dir: str | Path, state: dict, outputs: Iterable[str], *, tag: str, resume: bool = True) -> bool:
    """Make ``out_dir`` this stage's before it writes there, once its settings, inputs (and model) validated.

    Returns True when ``out_dir/state.json`` records exactly ``state`` and ``resume`` is on: the work there is
    this stage's to resume. Otherwise, when any of ``outputs`` (names in ``out_dir``) exists, the whole directory
    is moved aside to ``<out_dir>.stale-<time>/`` (:func:`move_aside`; never deleted) and one line says so. Either
    way ``out_dir`` exists afterwards and its ``state.json`` records ``state``."""
    out_dir = Path(out_dir)
    if resumable(out_dir, state, resume):
        return True
    old = read_json(out_dir / STATE)
    if any((out_dir / name).exists() for name in outputs):
        why = "a fresh start (resume off)" if old == state else "made from other settings or inputs"
        print(f"[{tag}] {out_dir}: {why}, moved to {move_aside(out_dir)}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / STATE, state)
    return False


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Append whole records and fsync. A crash can leave at most one partial last line, which
    :func:`read_jsonl` with ``tolerate_partial_tail=True`` ignores on resume."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: str | Path, tolerate_partial_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)``; a bad line raises InputError naming file and line.

    With ``tolerate_partial_tail`` a last line without its newline (an interrupted append) is skipped.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if tolerate_partial_tail and i == len(lines) and not line.endswith("\n"):
            return
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: invalid JSON: {e.msg}") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        yield i, rec


def read_jsonl(path: str | Path, tolerate_partial_tail: bool = False) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path, tolerate_partial_tail)]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_stamp(name_or_path: str) -> str | None:
    """For a local model directory, a stamp of its weight files (name, size, mtime), so work resumed on a path
    whose weights were rewritten in place (a retrained, re-merged student) is redone. None for hub names."""
    path = Path(name_or_path)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    return sha256_text("\n".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files))[:16]


def read_json(path: str | Path) -> dict | None:
    """The JSON object at ``path``, or None when it is missing or unreadable (resume state files)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


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
