"""What a teacher store holds, for ``ssb capture --inspect DIR`` and the demo report."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ssb.store.format import TeacherStore

SPARSE_KS = (32, 64, 256)  # the top-k a sparse store would keep, for a hidden store's inspection


def summarize(store: TeacherStore) -> dict:
    """Inspection figures: examples, rows, bytes/row, mean top-k teacher mass, share of reply tokens in the top-k
    (those two are None for a hidden store: it keeps no top-k; :func:`hidden_topk_mass` gives its figures)."""
    mass, hits, rows = 0.0, 0, 0
    hidden = store.store_format == "hidden"
    for i in range(len(store)):
        ex = store[i]
        if not hidden:
            mass += float(ex.topk_logprobs.float().exp().sum(-1).sum())
            hits += int((ex.topk_ids == ex.token_ids.unsqueeze(-1)).any(-1).sum())
        rows += ex.rows
    m = store.manifest
    dense = 4 * int(m["model"]["vocab_size"])
    bpr = store.bytes_per_row()
    return {
        "path": str(store.path),
        "model": m["model"]["id"],
        "backend": m.get("backend"),
        "k": store.k,
        "value_dtype": m["value_dtype"],
        "store_format": store.store_format,
        "exact_temperatures": store.exact_temperatures,
        "examples": len(store),
        "rows": rows,
        "skipped": m["counts"]["skipped"],
        "bytes_per_row": bpr,
        "dense_fp32_bytes_per_row": dense,
        "ratio_to_dense": bpr / dense if dense else math.nan,
        "mean_topk_mass": None if hidden else mass / max(rows, 1),
        "reply_token_in_topk": None if hidden else hits / max(rows, 1),
        "hidden_size": m["hidden"]["size"] if hidden else None,
    }


def training_temperature(store: TeacherStore) -> float:
    """The T the store's run trains at: ``train.kd_temperature`` of the config saved beside it, else the largest
    captured temperature."""
    import yaml

    saved = store.path / "config.yaml"
    if saved.is_file():
        t = ((yaml.safe_load(saved.read_text()) or {}).get("train") or {}).get("kd_temperature")
        if t is not None:
            return float(t)
    return max(float(t) for t in store.manifest["temperatures"])


def load_head(store: TeacherStore) -> torch.Tensor:
    """The LM head (V, H) of the store's model in the stored dtype on CPU, refused unless its fingerprint is the
    captured one (:class:`~ssb.store.compat.StoreMismatchError`)."""
    from ssb.config import ModelConfig
    from ssb.core.models import load_causal_lm
    from ssb.store.compat import StoreMismatchError
    from ssb.store.hidden import head_fingerprint

    m = store.manifest
    cfg = ModelConfig(name_or_path=m["model"]["id"], revision=m["model"].get("revision"), dtype=m["value_dtype"])
    model = load_causal_lm(cfg, "cpu")
    if head_fingerprint(model)["head_sha256"] != m["hidden"]["head_sha256"]:
        raise StoreMismatchError(
            f"{store.path}/manifest.json: the LM head of {m['model']['id']} is not the one "
            "the store was captured with (head sha256 differs): no top-k mass"
        )
    return model.get_output_embeddings().weight.detach()


def hidden_topk_mass(
    store: TeacherStore,
    temperature: float,
    ks=SPARSE_KS,
    weight: torch.Tensor | None = None,
    rows_per_chunk: int = 1024,
) -> dict:
    """Mean over the rows of a hidden store of the teacher mass at ``temperature`` that a sparse store's top-k
    would keep, for each k in ``ks``; streamed over the vocabulary and over chunks of rows (no (N, V) tensor)."""
    from ssb.store.hidden import topk_mass

    weight = load_head(store) if weight is None else weight
    sums, rows, t0 = dict.fromkeys(ks, 0.0), 0, time.perf_counter()
    pending: list[torch.Tensor] = []

    def flush() -> None:
        m = topk_mass(torch.cat(pending), weight, ks, [temperature], rows_per_chunk=rows_per_chunk)
        for k in ks:
            sums[k] += float(m[float(temperature)][k].sum())
        pending.clear()

    for i in range(len(store)):  # examples gathered into chunks of about rows_per_chunk rows
        pending.append(store[i].hidden)
        rows += pending[-1].shape[0]
        if sum(h.shape[0] for h in pending) >= rows_per_chunk:
            flush()
    if pending:
        flush()
    return {
        "temperature": float(temperature),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "mass": {k: sums[k] / max(rows, 1) for k in ks},
    }


def print_inspect(path: str | Path) -> None:
    store = TeacherStore(path)
    s = summarize(store)
    print(f"teacher store {s['path']}  ({s['backend']} backend, model {s['model']})")
    print(f"  examples {s['examples']}  rows {s['rows']}  skipped {s['skipped']}")
    if s["store_format"] == "hidden":
        print(
            f"  hidden: the teacher's final hidden states, H {s['hidden_size']} in {s['value_dtype']}, exact at "
            "every temperature"
        )
    else:
        values = s["value_dtype"] if s["store_format"] == "exact" else "compact (ids bit-packed, log-probs companded)"
        print(f"  k {s['k']}  values {values}  exact c_T for T in {s['exact_temperatures']}")
    print(
        f"  bytes/row {s['bytes_per_row']:.1f}  (dense float32: {s['dense_fp32_bytes_per_row']}, "
        f"ratio {s['ratio_to_dense']:.2e})"
    )
    if s["store_format"] == "hidden":
        r = hidden_topk_mass(store, training_temperature(store))
        masses = "  ".join(f"k={k} {v:.4f}" for k, v in r["mass"].items())
        print(f"  teacher mass a sparse store would keep at T={r['temperature']:g} (training T): {masses}")
        return
    print(f"  mean teacher mass in top-k {s['mean_topk_mass']:.4f}")
    print(f"  reply tokens inside the top-k {100 * s['reply_token_in_topk']:.2f}%")
