"""The teacher store: sparse top-k teacher log-probs in sha256-verified safetensors shards (docs/SPEC.md section 5).

Layout of a store directory::

    manifest.json              written last; lists every shard with its row count and sha256
    shard-00000.safetensors    examples [0, S) of student.jsonl (S = capture.shard_examples), then [S, 2S), ...

Shard ``j`` always covers the same input examples, so a rerun skips every shard already on disk whose
fingerprint (model, tokenizer, prompts, inputs, k, dtype, temperatures) matches. Loading maps the shards
read-only (no copy) after checking sha256, shapes and dtypes, and names the bad file on failure. Nothing is
ever unpickled. ``lse_T1.0`` is not stored: ``c_1 = 0`` exactly by definition (SPEC section 1). A hidden store
(:mod:`ssb.store.hidden`) holds the teacher's final hidden states instead of a top-k, and no ``c_T`` (exact from them).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ssb.core.files import atomic_write_bytes, atomic_write_json, sha256_file
from ssb.store import compact

FORMAT = "ssb-teacher-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORE_FORMATS = ("exact", "compact", "hidden")  # manifest "store_format" (absent: exact); readers accept all
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # bf16: hidden only
SHARD_RE = re.compile(r"^shard-(\d{5})\.safetensors$")


class StoreError(ValueError):
    """A store is missing, corrupt or inconsistent; the message names the file."""


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


def lse_key(temperature: float) -> str:
    return f"lse_T{float(temperature)!r}"


# --------------------------------------------------------------------------------------------------
# One example, as captured and as loaded (the student side is ssb.store.pairing)


@dataclass(frozen=True)
class StoreExample:
    """The sparse teacher targets of one example; row r predicts ``token_ids[r]``.

    Shape:
        token_ids (R,) int32 - reply tokens, end-of-turn included
        topk_ids (R, k) int32 - sorted by descending teacher log-prob
        topk_logprobs (R, k) float32|float16 - full-vocabulary log-probs at T = 1
        lse {T: (R,) float32} - exact c_T per captured temperature (T = 1 is zeros)
        token_logprob (R,) float32 - teacher log-prob of ``token_ids[r]``, also outside the top-k
        hidden (R, H) float32|bfloat16|float16 or None - hidden stores only: the teacher's final hidden states
            (then topk_ids/topk_logprobs are (R, 0) and lse is empty: c_T is exact from ``hidden``)
    """

    example_index: int
    token_ids: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    lse: dict[float, torch.Tensor]
    token_logprob: torch.Tensor
    hidden: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.token_ids.shape[0])


# --------------------------------------------------------------------------------------------------
# Writing


class StoreWriter:
    """Writes shards atomically (temp file + rename) and the manifest last; knows which shards are done.

    ``header`` goes into the manifest verbatim and must contain ``fingerprint``. The writer never removes a
    shard: which shards to (re)write, and what to move aside first, is :func:`check_store`'s answer.
    """

    def __init__(
        self,
        path: str | Path,
        header: dict,
        *,
        k: int,
        value_dtype: str,
        temperatures: list[float],
        store_format: str = "exact",
    ):
        if store_format not in STORE_FORMATS:
            raise ValueError(f"store_format: expected one of {STORE_FORMATS}, got {store_format!r}")
        if store_format == "hidden":  # header["hidden"]: dtype, size and fingerprints (ssb.store.hidden)
            value_dtype, k, temperatures = header["hidden"]["dtype"], 0, []
        elif value_dtype not in ("float32", "float16"):
            raise ValueError(f"value_dtype: expected float32 or float16, got {value_dtype!r}")
        self.store_format = store_format
        self.vocab_size = int(header["model"]["vocab_size"]) if store_format == "compact" else None
        self.path = Path(path)
        self.header = header
        self.fingerprint = str(header["fingerprint"])
        self.k = k
        self.value_dtype = value_dtype
        self.temperatures = [float(t) for t in temperatures if float(t) != 1.0]  # stored lse_T keys
        self.path.mkdir(parents=True, exist_ok=True)
        self._drop_temp_files()

    def _drop_temp_files(self) -> None:
        for f in sorted(self.path.glob(".shard-*.tmp")):
            f.unlink()  # our own write, interrupted before its rename

    def _shard_meta(self, f: Path) -> dict | None:
        meta = shard_meta(f)
        return meta if meta is not None and meta.get("fingerprint") == self.fingerprint else None

    def write_shard(self, j: int, examples: list[StoreExample], skipped: list[dict]) -> Path:
        """Serialise ``examples`` (in input order) and ``skipped`` records into shard ``j``, atomically."""
        vdt = VALUE_DTYPES[self.value_dtype]
        offsets = torch.tensor([0] + [e.rows for e in examples], dtype=torch.int64).cumsum(0)  # (n+1,)

        def cat(get, dtype, shape_tail=()):
            parts = [get(e).to(dtype).reshape(-1, *shape_tail) for e in examples]
            return torch.cat(parts) if parts else torch.zeros(0, *shape_tail, dtype=dtype)

        tensors = {
            "offsets": offsets,
            "example_index": torch.tensor([e.example_index for e in examples], dtype=torch.int64),
            "token_ids": cat(lambda e: e.token_ids, torch.int32),
            "token_logprob": cat(lambda e: e.token_logprob, torch.float32),
        }
        if self.store_format == "hidden":  # the teacher's final hidden states instead of a top-k
            tensors["hidden"] = cat(lambda e: e.hidden, vdt, (int(self.header["hidden"]["size"]),))
        else:
            tensors["topk_ids"] = cat(lambda e: e.topk_ids, torch.int32, (self.k,))
            tensors["topk_logprobs"] = cat(lambda e: e.topk_logprobs, vdt, (self.k,))
        if self.store_format == "compact":  # ids and log-probs packed (ssb.store.compact); the rest stays exact
            ids, lp = tensors.pop("topk_ids"), tensors.pop("topk_logprobs")
            tensors.update(compact.encode(ids, lp.float(), self.vocab_size))
        for t in self.temperatures:
            tensors[lse_key(t)] = cat(lambda e, t=t: e.lse[t], torch.float32)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "shard": j,
            "skipped": skipped,
        }
        # one metadata key: safetensors keeps metadata in a hash map, so several keys serialise in random order
        # and an identical recapture would not give identical bytes
        blob = {"ssb": json.dumps(meta, sort_keys=True)}
        out = self.path / shard_name(j)
        atomic_write_bytes(out, st_save({n: t.contiguous() for n, t in tensors.items()}, metadata=blob))
        return out

    def finish(self, n_shards: int, extra: dict | None = None) -> dict:
        """Collect shard counts, hashes and skip records and write ``manifest.json`` (last). Returns it."""
        shards, skipped, rows, examples = [], [], 0, 0
        for j in range(n_shards):
            f = self.path / shard_name(j)
            meta = self._shard_meta(f)
            if meta is None:
                raise StoreError(f"{f}: missing or written under another fingerprint; rerun ssb capture")
            with safe_open(str(f), framework="pt") as h:
                n_rows = h.get_slice("token_ids").get_shape()[0]
                n_ex = h.get_slice("example_index").get_shape()[0]
            skipped.extend(meta["skipped"])
            shards.append(
                {"file": f.name, "examples": n_ex, "rows": n_rows, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            )
            rows += n_rows
            examples += n_ex
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.header,
            "k": self.k,
            "value_dtype": self.value_dtype,
            "store_format": self.store_format,
            **({"compact": compact.layout(self.vocab_size)} if self.store_format == "compact" else {}),
            "counts": {"examples": examples, "rows": rows, "skipped": len(skipped)},
            "skipped": skipped,
            "shards": shards,
            **(extra or {}),
        }
        atomic_write_json(self.path / MANIFEST, manifest)
        return manifest


def shard_meta(f: Path) -> dict | None:
    """The ``ssb`` metadata of shard file ``f`` (its fingerprint, index, skip records), or None if unreadable."""
    try:
        with safe_open(str(f), framework="pt") as h:
            meta = json.loads((h.metadata() or {})["ssb"])
    except Exception:  # noqa: BLE001 - any unreadable shard is simply redone
        return None
    return meta if isinstance(meta, dict) else None


def shard_problem(f: Path, rec: dict, *, verify: bool = True) -> str | None:
    """What is wrong with shard file ``f`` against its manifest entry ``rec`` (missing, size, sha256 with
    ``verify``), or None. One check for the reader (:class:`TeacherStore`) and for ``ssb capture``'s repair."""
    if not f.exists():
        return f"shard listed in {MANIFEST} is missing"
    if f.stat().st_size != rec.get("bytes"):
        return f"size {f.stat().st_size} != {rec.get('bytes')} bytes in {MANIFEST} (truncated?)"
    if verify and sha256_file(f) != rec.get("sha256"):
        return f"sha256 does not match {MANIFEST} (corrupt shard)"
    return None


# --------------------------------------------------------------------------------------------------
# Reading

_DTYPES = {
    "I64": torch.int64,
    "I32": torch.int32,
    "F32": torch.float32,
    "F16": torch.float16,
    "U8": torch.uint8,
    "BF16": torch.bfloat16,
}


def _mmap_tensors(f: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a read-only view of one private mmap (no copy, no pickle)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise StoreError(f"{f}: truncated safetensors header")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    storage = torch.UntypedStorage.from_file(str(f), shared=False, nbytes=size)
    base = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = {}
    for name, info in header.items():
        start, end = (8 + n + o for o in info["data_offsets"])
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None or end > size:
            raise StoreError(f"{f}: tensor {name!r} has dtype {info['dtype']} or offsets beyond the file")
        out[name] = base[start:end].view(dtype).reshape(info["shape"])
    return out


class TeacherStore:
    """A verified, memory-mapped teacher store; ``store[i]`` is the i-th captured example (input order).

    ``verify=True`` checks every shard's sha256 against the manifest (reads each file once).
    """

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise StoreError(f"{mpath}: missing (capture not run or not finished: rerun ssb capture to resume)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{mpath}: invalid JSON: {e}") from None
        self.manifest["path"] = str(self.path)
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{mpath}: not an {FORMAT} v{FORMAT_VERSION} manifest")
        self.k = int(self.manifest["k"])
        self.store_format = self.manifest.get("store_format", "exact")
        if self.store_format not in STORE_FORMATS:
            raise StoreError(f"{mpath}: unknown store_format {self.store_format!r} (known: {STORE_FORMATS})")
        self.vocab_size = int(self.manifest["model"]["vocab_size"])
        self.exact_temperatures = [float(t) for t in self.manifest["exact_temperatures"]]
        self._shards = [self._load_shard(s, verify) for s in self.manifest["shards"]]
        self._index = [(si, j) for si, sh in enumerate(self._shards) for j in range(sh["example_index"].shape[0])]

    def _load_shard(self, rec: dict, verify: bool) -> dict[str, torch.Tensor]:
        f = self.path / rec["file"]
        problem = shard_problem(f, rec, verify=verify)
        if problem is not None:
            raise StoreError(f"{f}: {problem}; rerun ssb capture to repair it")
        try:
            t = _mmap_tensors(f)
        except (ValueError, RuntimeError, KeyError, struct.error) as e:
            raise StoreError(f"{f}: unreadable shard: {e}") from None
        self._check_shapes(f, t, rec)
        return t

    def _check_shapes(self, f: Path, t: dict[str, torch.Tensor], rec: dict) -> None:
        n, rows, k = rec["examples"], rec["rows"], self.k
        vdt = VALUE_DTYPES.get(self.manifest["value_dtype"])
        want = {
            "offsets": ((n + 1,), torch.int64),
            "example_index": ((n,), torch.int64),
            "token_ids": ((rows,), torch.int32),
            "topk_ids": ((rows, k), torch.int32),
            "topk_logprobs": ((rows, k), vdt),
            "token_logprob": ((rows,), torch.float32),
        }
        if self.store_format == "compact":
            del want["topk_ids"], want["topk_logprobs"]
            want.update({name: ((rows, *tail), dt) for name, (tail, dt) in compact.shapes(k, self.vocab_size).items()})
        if self.store_format == "hidden":
            del want["topk_ids"], want["topk_logprobs"]
            want["hidden"] = ((rows, int(self.manifest["hidden"]["size"])), vdt)
        for temp in self.exact_temperatures if self.store_format != "hidden" else ():
            if temp != 1.0:
                want[lse_key(temp)] = ((rows,), torch.float32)
        for name, (shape, dtype) in want.items():
            if name not in t:
                raise StoreError(f"{f}: tensor {name!r} missing")
            if tuple(t[name].shape) != shape or t[name].dtype != dtype:
                raise StoreError(
                    f"{f}: tensor {name!r} is {tuple(t[name].shape)} {t[name].dtype}, expected {shape} {dtype}"
                )
        off = t["offsets"]
        if n and (off[0] != 0 or off[-1] != rows or bool((off[1:] < off[:-1]).any())):
            raise StoreError(f"{f}: offsets are not a non-decreasing 0..{rows} partition")

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> StoreExample:
        si, j = self._index[i]
        t = self._shards[si]
        a, b = int(t["offsets"][j]), int(t["offsets"][j + 1])
        lse = {1.0: torch.zeros(b - a, dtype=torch.float32)}
        if self.store_format != "hidden":  # a hidden store's c_T is exact from its hidden states, never stored
            lse.update({temp: t[lse_key(temp)][a:b] for temp in self.exact_temperatures if temp != 1.0})
        hidden = None
        if self.store_format == "compact":
            ids, lp = compact.decode({n: t[n][a:b] for n in compact.NAMES}, self.k, self.vocab_size)
        elif self.store_format == "hidden":
            hidden = t["hidden"][a:b]
            ids, lp = torch.zeros(b - a, 0, dtype=torch.int32), torch.zeros(b - a, 0, dtype=torch.float32)
        else:
            ids, lp = t["topk_ids"][a:b], t["topk_logprobs"][a:b]
        return StoreExample(
            example_index=int(t["example_index"][j]),
            token_ids=t["token_ids"][a:b],
            topk_ids=ids,
            topk_logprobs=lp,
            lse=lse,
            token_logprob=t["token_logprob"][a:b],
            hidden=hidden,
        )

    def bytes_per_row(self) -> float:
        rows = max(1, self.manifest["counts"]["rows"])
        return sum(s["bytes"] for s in self.manifest["shards"]) / rows
