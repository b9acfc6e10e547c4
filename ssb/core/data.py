"""Math problems from the hub (GSM8K, MATH500, AIME2024), local files or the toy world, as ``Problem`` records.

``load_problems(source, split, ...)`` accepts

- an alias: ``"gsm8k"`` (openai/gsm8k, config main), ``"math500"`` (HuggingFaceH4/MATH-500), ``"aime2024"``
  (HuggingFaceH4/aime_2024), or ``"toy"`` (the toy world's deterministic splits, generated in memory: train,
  test, and val, the train-split problems after the first 1,000, which rollouts never reach; ``"toy_val"`` is
  that split as an eval benchmark name, for tuning without touching the test split), or ``"arith"``
  (:mod:`ssb.core.arith`: generated one- and two-step arithmetic word problems in five levels, for small real
  models; splits train, val and test, ``"arith_val"`` as a benchmark name; ``"arith_easy"`` / ``"arith_easy_val"``
  its one-step single-digit levels 1-3 only);
- a hub name (``"openai/gsm8k"``, any ``owner/name``), loaded with ``datasets.load_dataset``. When the
  environment variable ``SSB_DATASETS_MIRROR`` names a directory holding ``<owner>/<name>/`` (a copy of the hub
  repository: parquet/jsonl files plus its README config), that copy is loaded instead (offline clusters, tests);
- a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a ``datasets.save_to_disk`` directory, or a directory laid
  out like a hub repository. Local paths never touch the network.

Fields are found by name (question/problem, answer, id/unique_id) or mapped with keyword arguments, e.g.
``load_problems("x.jsonl", question="prompt", answer="target")``. An answer containing ``####`` is GSM8K style:
the gold is what follows the last ``####`` and the full text is kept as ``meta["solution"]``. Other fields go
to ``meta``. Malformed records (bad JSON line, missing field, empty question/answer, duplicate id) raise
``InputError`` naming file and line (or dataset row); with ``skip_invalid=True`` they are skipped, and the
returned ``ProblemList`` lists them in ``.skipped`` (a warning with the count is logged too).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssb.core.files import InputError

log = logging.getLogger(__name__)

FIELD_KEYS = ("question", "answer", "id")
DEFAULT_FIELDS = {
    "question": ("question", "problem", "Question", "Problem"),
    "answer": ("answer", "Answer"),
    "id": ("id", "unique_id", "ID"),
}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
TOY_SIZES = {"train": 1000, "val": 500, "test": 500}  # toy problems per split without ``limit`` (a limit: a prefix)


@dataclass(frozen=True)
class Problem:
    """One math problem. ``answer`` is the gold final answer only (no worked solution)."""

    id: str
    question: str
    answer: str
    source: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """A record ``load_problems(..., skip_invalid=True)`` left out, and why."""

    where: str  # "file:line" or "name[split] row i"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class ProblemList(list):
    """A list of ``Problem`` that also carries the records skipped while loading (``.skipped``)."""

    def __init__(self, problems: Iterable[Problem] = (), skipped: Iterable[Skip] = (), source: str = ""):
        super().__init__(problems)
        self.skipped: list[Skip] = list(skipped)
        self.source = source


@dataclass(frozen=True)
class HubSpec:
    """Where a benchmark lives on the hub and how its columns map onto ``Problem``."""

    path: str
    config: str | None
    default_split: str
    question: str
    answer: str
    id: str | None = None


HUB = {
    "gsm8k": HubSpec("openai/gsm8k", "main", "test", "question", "answer"),
    "math500": HubSpec("HuggingFaceH4/MATH-500", None, "test", "problem", "answer", id="unique_id"),
    "aime2024": HubSpec("HuggingFaceH4/aime_2024", None, "train", "problem", "answer", id="id"),
}
_BY_PATH = {spec.path.lower(): name for name, spec in HUB.items()}


# --------------------------------------------------------------------------------------------------
# Record -> Problem


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K-style solution (text after the last ``####``)."""
    return answer.rsplit("####", 1)[-1].strip()


def _pick(rec: dict, key: str, fields: dict[str, str | None]) -> tuple[str | None, Any]:
    """(column name, value) of ``key`` in ``rec``: the mapped column, else the first default name present."""
    mapped = fields.get(key)
    names = (mapped,) if mapped else DEFAULT_FIELDS[key]
    for name in names:
        if name in rec:
            return name, rec[name]
    return None, None


def to_problem(
    rec: dict, where: str, source: str, fields: dict[str, str | None], default_id: str, map_hint: str | None = None
) -> Problem:
    """Validate one raw record; raise InputError naming ``where`` and the field on any defect. ``map_hint``: the
    config key that maps columns (``data.field_map``), named in the fix for a missing field; None: there is none."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected an object, got {type(rec).__name__}")
    q_name, question = _pick(rec, "question", fields)
    a_name, answer = _pick(rec, "answer", fields)
    i_name, rid = _pick(rec, "id", fields)
    for key, name, value in (("question", q_name, question), ("answer", a_name, answer)):
        if name is None:
            wanted = fields.get(key) or " / ".join(DEFAULT_FIELDS[key])
            fix = f"map another with {map_hint}.{key}=COLUMN" if map_hint else f"name the column {wanted}"
            raise InputError(f"{where}: missing field {wanted!r} (the {key}; {fix})")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise InputError(f"{where}: field {name!r} must be text or a number, got {type(value).__name__}")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: empty question in field {q_name!r}")
    meta = {k: v for k, v in rec.items() if k not in (q_name, a_name, i_name)}
    answer = str(answer).strip()
    if "####" in answer:
        meta["solution"] = answer
        answer = gsm8k_gold(answer)
    if not answer:
        raise InputError(f"{where}: empty answer in field {a_name!r}")
    pid = default_id if rid is None or str(rid).strip() == "" else str(rid).strip()
    return Problem(id=pid, question=question.strip(), answer=answer, source=source, meta=meta)


# --------------------------------------------------------------------------------------------------
# Raw record streams: (where, default_id, record | None, error | None)

Row = tuple[str, str, Any, str | None]


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield where, "", None, "not valid UTF-8"
                continue
            if not line.strip():
                continue
            try:
                yield where, f"{path.stem}-{line_no}", json.loads(line), None
            except json.JSONDecodeError as e:
                yield where, "", None, f"invalid JSON: {e.msg}"


def _json_rows(path: Path) -> Iterator[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file that is really JSON lines
            yield from _jsonl_rows(path)
            return
        raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: expected a list of records (or an object holding exactly one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise InputError(f"{path}: expected a list of records, got {type(obj).__name__}")
    for i, rec in enumerate(obj):
        yield f"{path}: record {i}", f"{path.stem}-{i}", rec, None


def _table_rows(rows: Iterable[dict], label: str, id_prefix: str) -> Iterator[Row]:
    for i, rec in enumerate(rows):
        yield f"{label} row {i}", f"{id_prefix}{i}", rec, None


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - any pyarrow failure is a malformed input file
        raise InputError(f"{path}: cannot read parquet: {e}") from None
    yield from _table_rows(rows, str(path), f"{path.stem}-")


def _pick_split(dsd, split: str | None, default: str | None, label: str):
    """One split of a DatasetDict: ``split``, else ``default``, else the only one."""
    want = split or default
    if want is None:
        if len(dsd) != 1:
            raise InputError(f"{label}: has splits {sorted(dsd)}; choose one with split=")
        want = next(iter(dsd))
    if want not in dsd:
        raise InputError(f"{label}: no split {want!r} (has {sorted(dsd)})")
    return want, dsd[want]


def _dataset_rows(source: str, split: str | None, subset: str | None, spec: HubSpec | None, tag: str) -> Iterator[Row]:
    """Rows of a saved dataset directory, a hub-shaped local directory, or a hub dataset (ids ``tag/split/i``)."""
    import datasets

    default = spec.default_split if spec else None
    config = subset or (spec.config if spec else None)
    local = Path(source)
    if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
        ds = datasets.load_from_disk(str(local))  # save_to_disk output
        if isinstance(ds, datasets.DatasetDict):
            split, ds = _pick_split(ds, split, default, source)
    else:
        try:
            dsd = datasets.load_dataset(source, config)
        except Exception as e:  # noqa: BLE001 - network, auth or format problems: say which source failed
            raise InputError(
                f"cannot load dataset {source!r} (config {config!r}): {e}; pass a local .jsonl/.json/.parquet file "
                "or a saved dataset directory instead, or a hub mirror in SSB_DATASETS_MIRROR"
            ) from e
        split, ds = _pick_split(dsd, split, default, source)
    yield from _table_rows(ds, f"{source}[{split}]", f"{tag}/{split}/")


def _toy_rows(split: str | None, limit: int | None) -> Iterator[Row]:
    split = split or "test"
    if split not in TOY_SIZES:
        raise InputError(f"toy: no split {split!r} (has {sorted(TOY_SIZES)})")
    try:
        from ssb.toy import world as toy
    except ImportError as e:
        raise RuntimeError("source 'toy' needs ssb.toy (the toy world), which is not available") from e
    n = TOY_SIZES[split] if limit is None else limit
    if split == "val":  # the train split's sequence after its first TOY_SIZES["train"] problems
        drawn = toy.problems("train", TOY_SIZES["train"] + n, seed=0)[TOY_SIZES["train"] :]
    else:
        if split == "train" and n > TOY_SIZES["train"]:
            log.warning("toy train limit %d reaches into the toy val split (train rows >= %d)", n, TOY_SIZES["train"])
        drawn = toy.problems(split, n, seed=0)
    for i, p in enumerate(drawn):
        rec = dict(toy.gsm8k_record(p), traps=list(getattr(p, "traps", ())))
        yield f"toy[{split}] row {i}", f"toy/{split}/{i}", rec, None


def _arith_rows(split: str | None, limit: int | None, easy: bool = False) -> Iterator[Row]:
    """``arith`` problems of ``split``; with ``easy``, only its EASY_LEVELS (ids keep their index in the split)."""
    from ssb.core import arith

    levels = arith.EASY_LEVELS if easy else None
    split = split or "test"
    if split not in arith.SIZES:
        raise InputError(f"arith: no split {split!r} (has {sorted(arith.SIZES)})")
    n = arith.SIZES[split] if levels or limit is None else min(limit, arith.SIZES[split])
    rows = [(i, rec) for i, rec in enumerate(arith.problems(split, n)) if not levels or rec["level"] in levels]
    if limit is not None and limit > (len(rows) if levels else arith.SIZES[split]):
        raise InputError(f"arith: limit {limit} is more than the {split} split's {len(rows)} problems")
    for i, rec in rows[:limit]:
        yield f"arith[{split}] row {i}", f"arith/{split}/{i}", rec, None


# --------------------------------------------------------------------------------------------------
# Public entry point


def _mirror(path: str) -> Path | None:
    root = os.environ.get("SSB_DATASETS_MIRROR")
    return Path(root) / path if root and (Path(root) / path).is_dir() else None


def _rows(
    source: str, split: str | None, subset: str | None, limit: int | None
) -> tuple[Iterator[Row], HubSpec | None, str]:
    """The row stream of ``source``, its hub spec (if a known benchmark) and the name problems are tagged with."""
    key = source.lower()
    if key == "toy":
        return _toy_rows(split, limit), None, "toy"
    if key == "toy_val":
        return _toy_rows("val", limit), None, "toy"
    if key in ("arith", "arith_val"):  # generated arithmetic word problems (ssb.core.arith); arith_val for tuning
        return _arith_rows("val" if key == "arith_val" else split, limit), None, "arith"
    if key in ("arith_easy", "arith_easy_val"):  # its levels 1-3 (one-step, single digits)
        return _arith_rows("val" if key.endswith("_val") else split, limit, easy=True), None, "arith_easy"
    name = key if key in HUB else _BY_PATH.get(key)
    spec = HUB.get(name) if name else None
    path = Path(source).expanduser()
    if spec is None and path.exists():
        if path.is_dir():
            return _dataset_rows(str(path), split, subset, None, path.name), None, str(source)
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
        if path.suffix not in readers:
            raise InputError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(LOCAL_SUFFIXES)})")
        return readers[path.suffix](path), None, str(source)
    if spec is None and (path.suffix in LOCAL_SUFFIXES or source.startswith(("/", ".", "~"))):
        raise InputError(f"{source}: no such file")
    hub_path = spec.path if spec else source
    tag = name or source
    return _dataset_rows(str(_mirror(hub_path) or hub_path), split, subset, spec, tag), spec, tag


def load_problems(
    source: str | os.PathLike,
    split: str | None = None,
    *,
    subset: str | None = None,
    limit: int | None = None,
    skip_invalid: bool = False,
    map_hint: str | None = "data.field_map",
    **field_map: str,
) -> ProblemList:
    """Load and validate problems; see the module docstring for sources, field mapping and errors.

    ``split`` picks a hub/saved split (default: the benchmark's test split; ignored for single files),
    ``subset`` a hub config, ``limit`` keeps the first N valid problems. Returns a ``ProblemList`` (a list of
    ``Problem``) whose ``.skipped`` holds every record left out under ``skip_invalid=True``. ``map_hint``: the config
    key a missing field's message says to set (None where columns cannot be mapped, as in eval).
    """
    unknown = sorted(set(field_map) - set(FIELD_KEYS))
    if unknown:
        raise ValueError(f"load_problems: unknown field mapping {unknown} (allowed: {', '.join(FIELD_KEYS)})")
    if limit is not None and limit < 0:
        raise ValueError(f"load_problems: limit must be >= 0, got {limit}")
    source = str(source)
    rows, spec, tag = _rows(source, split, subset, limit)
    fields: dict[str, str | None] = {k: field_map.get(k) for k in FIELD_KEYS}
    if spec is not None:
        fields = {"question": spec.question, "answer": spec.answer, "id": spec.id} | {
            k: v for k, v in field_map.items() if v
        }
    problems: list[Problem] = []
    skipped: list[Skip] = []
    seen: dict[str, str] = {}
    for where, default_id, rec, error in rows:
        if limit is not None and len(problems) >= limit:
            break
        try:
            if error is not None:
                raise InputError(f"{where}: {error}")
            p = to_problem(rec, where, tag, fields, default_id, map_hint)
            if p.id in seen:
                raise InputError(f"{where}: duplicate id {p.id!r} (first at {seen[p.id]})")
        except InputError as e:
            if not skip_invalid:
                raise
            skipped.append(Skip(where, str(e).removeprefix(f"{where}: ")))
            continue
        seen[p.id] = where
        problems.append(p)
    if skipped:
        log.warning("load_problems(%s): skipped %d invalid record(s), first: %s", source, len(skipped), skipped[0])
    return ProblemList(problems, skipped, source)
