"""What a teacher store holds, for ``ssb capture --inspect DIR`` and the demo report."""

from __future__ import annotations

import math
from pathlib import Path

from ssb.store.format import TeacherStore


def summarize(store: TeacherStore) -> dict:
    """Inspection figures: examples, rows, bytes/row, mean top-k teacher mass, share of reply tokens in the top-k."""
    mass, hits, rows = 0.0, 0, 0
    for i in range(len(store)):
        ex = store[i]
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
        "mean_topk_mass": mass / max(rows, 1),
        "reply_token_in_topk": hits / max(rows, 1),
    }


def print_inspect(path: str | Path) -> None:
    s = summarize(TeacherStore(path))
    print(f"teacher store {s['path']}  ({s['backend']} backend, model {s['model']})")
    print(f"  examples {s['examples']}  rows {s['rows']}  skipped {s['skipped']}")
    values = s["value_dtype"] if s["store_format"] == "exact" else "compact (ids bit-packed, log-probs companded)"
    print(f"  k {s['k']}  values {values}  exact c_T for T in {s['exact_temperatures']}")
    print(f"  bytes/row {s['bytes_per_row']:.1f}  (dense float32: {s['dense_fp32_bytes_per_row']}, "
          f"ratio {s['ratio_to_dense']:.2e})")  # fmt: skip
    print(f"  mean teacher mass in top-k {s['mean_topk_mass']:.4f}")
    print(f"  reply tokens inside the top-k {100 * s['reply_token_in_topk']:.2f}%")
