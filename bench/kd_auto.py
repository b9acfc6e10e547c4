"""Where eager beats chunked: fwd+bwd time of both over a grid of N x V on CPU, for ``impl="auto"``'s threshold.

    python bench/kd_auto.py                 # the grid below, min of 3 alternating calls per cell (~5-10 min, 2 cores)
    python bench/kd_auto.py --h 576 --v 49152 --n 256,1024,4096

V covers the toy (795), a small and a real vocabulary (SmolLM2's 49,152) and Qwen's 151,936; cells whose eager
logits would pass ``--max-nv`` elements are left out. Eager and chunked run in one process, alternating, after a
warm-up each, so both see the same load. Writes ``bench/results/kd_auto.json`` (suite ``kd_auto``: one entry per
cell with both times and the ratio, and ``threshold`` with the measured crossover) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hardware import device_name  # noqa: E402
from kd_providers import make_fn  # noqa: E402
from measure import record, results_dir, time_calls  # noqa: E402
from shapes import KDShape, make_kd_inputs  # noqa: E402

GRID_N = (64, 256, 1024, 4096, 16384)
GRID_V = (795, 4096, 16384, 49152, 151936)


def measure_cell(n: int, h: int, v: int, k: int, repeats: int) -> dict:
    """Min fwd+bwd seconds of eager and chunked on one shape, alternating calls."""
    x = make_kd_inputs(KDShape(f"n{n}-h{h}-v{v}", n=n, h=h, v=v, k=min(k, v), temperature=2.0), "cpu")
    fns = {p: make_fn(x, p) for p in ("eager", "chunked")}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {p: [] for p in fns}
    for _ in range(repeats):
        for p, fn in fns.items():
            times[p] += time_calls(fn, 1)
    e, c = min(times["eager"]), min(times["chunked"])
    return {"n": n, "h": h, "v": v, "nv": n * v, "eager_s": e, "chunked_s": c, "chunked_over_eager": c / e}


def crossover(cells: list[dict]) -> dict:
    """The N x V below which eager won every measured cell, and the smallest N x V where chunked won.

    ``threshold_nv`` = the geometric mean of the two (the boundary sits somewhere between them); when the two
    sets overlap (a noisy or shape-dependent boundary) the overlap is reported instead of hidden.
    """
    eager_wins = [c["nv"] for c in cells if c["chunked_over_eager"] > 1.0]
    chunked_wins = [c["nv"] for c in cells if c["chunked_over_eager"] <= 1.0]
    hi_eager = max(eager_wins, default=0)
    lo_chunked = min(chunked_wins, default=math.inf)
    out = {"largest_nv_eager_faster": hi_eager, "smallest_nv_chunked_faster": lo_chunked}
    if lo_chunked > hi_eager:
        out["threshold_nv"] = math.sqrt(max(hi_eager, 1) * lo_chunked) if chunked_wins else None
        out["clean"] = True
    else:
        out["threshold_nv"] = math.sqrt(hi_eager * lo_chunked)  # geometric middle of the overlap
        out["clean"] = False
        out["overlap"] = sorted({c["nv"] for c in cells if lo_chunked <= c["nv"] <= hi_eager})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default=",".join(map(str, GRID_N)))
    ap.add_argument("--v", default=",".join(map(str, GRID_V)))
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-nv", type=float, default=2**28, help="skip cells with N x V above this (eager memory)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cells = []
    print(f"{device_name('cpu')}, H={args.h}, k={args.k}, T=2, fp32, min of {args.repeats}")
    print("| N | V | N x V | eager s | chunked s | chunked / eager |\n|---:|---:|---:|---:|---:|---:|")
    for v in (int(s) for s in args.v.split(",")):
        for n in (int(s) for s in args.n.split(",")):
            if n * v > args.max_nv:
                continue
            c = measure_cell(n, args.h, v, args.k, args.repeats)
            cells.append(c)
            print(f"| {n:,} | {v:,} | {n * v:,} | {c['eager_s']:.4f} | {c['chunked_s']:.4f} | "
                  f"{c['chunked_over_eager']:.2f} |", flush=True)  # fmt: skip
            params = {"provider": "eager-vs-chunked", "n": n, "h": args.h, "v": v, "k": args.k, "temperature": 2.0}
            figs = {k: c[k] for k in ("eager_s", "chunked_s", "chunked_over_eager")}
            record("kd_auto", f"n{n}-h{args.h}-v{v}", figs, params, device="cpu")
    cross = crossover(cells)
    params = {"provider": "eager-vs-chunked", "h": args.h, "k": args.k, "cells": len(cells), "repeats": args.repeats}
    record("kd_auto", f"threshold-h{args.h}", {k: cross[k] for k in ("threshold_nv", "largest_nv_eager_faster",
           "smallest_nv_chunked_faster") if isinstance(cross.get(k), int | float) and math.isfinite(cross[k])},
           params, device="cpu")  # fmt: skip
    print(f"\ncrossover: {cross}\nwrote {results_dir() / 'kd_auto.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
