"""Side by side with the peers on CPU: time and peak extra memory of one KD forward + backward, all on the same
inputs, with every ratio to ours (chunked) and to the bare-GEMM floor.

    python bench/peers.py                      # side by side at N=2048 + the quick scaling subset (make bench-peers)
    python bench/peers.py --scaling full       # the whole N x V x H grid (hours on 2 cores; skips what cannot fit)
    python bench/peers.py --scaling none --providers chunked,floor --chunked-chunks 1024,2048
    python bench/peers.py --report             # tables and plot again from bench/results/peers.json

Memory: each (provider, shape) in its own child process (``--one``): the inputs (bench/shapes.py, seed 0), a tiny
warm-up (8 rows: imports, library init, CCE's compile), then one full call inside ``peak_memory`` (peak RSS above
the RSS after the inputs exist). Time: one child per shape (``--time``) builds the inputs once and calls every
provider in turn for ``--rounds`` rounds after an 8-row warm-up each, so all of them see the same machine load; the
figure is the minimum. The floor is timed at every vocabulary chunk of FLOOR_CHUNKS and keeps the best. Results:
``bench/results/peers.json`` (entries ``<shape>/<provider>/cpu``, gated by bench/check.py: memory always, time
on dedicated devices) and ``bench/results/peers.png``. Peers come from ``.peers/`` (``make bench-peers``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hardware import device_name  # noqa: E402
from kd_providers import FLOOR_CHUNKS, PEERS, SEMANTICS, est_bytes  # noqa: E402
from measure import record, results_dir, run_child  # noqa: E402
from shapes import QWEN_V, SCALE_H, SCALE_N, SCALE_V, peer_shape  # noqa: E402

SIDE_BY_SIDE = ("chunked", "eager", "hidden-chunked", "hidden-eager", *PEERS, "floor")
HEADLINE = dict(n=2048, h=256, v=QWEN_V)
SUITE = "peers"
THREADS = int(os.environ.get("SSB_BENCH_THREADS", "2"))  # torch threads of every child (the runs: 2)


# ---------------------------------------------------------------------------------------------- one child
def _rows(x: dict, r: int) -> dict:
    """The first ``r`` rows of an input dict (tiny warm-up): same head, same H and V."""
    out = {k: (t[:r] if k not in ("weight", "temperature") else t) for k, t in x.items()}
    out["hidden"] = x["hidden"][:r].detach().requires_grad_(True)
    return out


def _split(name: str) -> tuple[str, int | None]:
    """``chunked-c1024`` -> ("chunked", 1024); ``axolotl`` -> ("axolotl", None)."""
    base, _, c = name.partition("-c") if name.startswith(("chunked-c", "floor-c")) else (name, "", "")
    return base, int(c) if c else None


def _inputs(n: int, h: int, v: int, k: int = 64, t: float = 2.0) -> dict:
    import torch
    from shapes import make_kd_inputs

    torch.set_num_threads(THREADS)
    return make_kd_inputs(peer_shape(n, h, v, k, t), "cpu")


def measure_memory(provider: str, n: int, h: int, v: int, k: int = 64, t: float = 2.0) -> dict:
    """Child side: peak extra RSS (and time) of the first full call of ``provider`` in this fresh process."""
    from kd_providers import make_fn
    from measure import peak_memory

    x = _inputs(n, h, v, k, t)
    base, chunk = _split(provider)
    t0 = time.perf_counter()
    make_fn(_rows(x, 8), base, chunk)()  # imports, library init, CCE's compile (not counted)
    warmup_s = time.perf_counter() - t0
    fn = make_fn(x, base, chunk)
    t0 = time.perf_counter()
    with peak_memory("cpu") as pm:
        fn()
    return {"first_call_s": time.perf_counter() - t0, "warmup_s": warmup_s, "peak_extra_mib": pm.peak_mib,
            "method": pm.method}  # fmt: skip


def time_shape(n: int, h: int, v: int, providers: list[str], rounds: int) -> dict:
    """Child side: every provider on ONE set of inputs in this process, calls alternating round by round (so all
    see the same load), after an 8-row warm-up each; min per provider. ``floor`` is timed at every FLOOR_CHUNKS chunk
    and keeps the best."""
    from kd_providers import make_fn
    from measure import time_calls

    x = _inputs(n, h, v)
    names = [f"floor-c{c}" for c in FLOOR_CHUNKS] if "floor" in providers else []
    names = [p for p in providers if p != "floor"] + names
    for name in names:  # warm-up on 8 rows: imports, library init, CCE's compile
        make_fn(_rows(x, 8), *_split(name))()
    fns = {name: make_fn(x, *_split(name)) for name in names}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += time_calls(fn, 1)
    out = {name: {"time_min_s": min(t), "times_s": t} for name, t in times.items() if not name.startswith("floor")}
    floors = {_split(name)[1]: min(t) for name, t in times.items() if name.startswith("floor")}
    if floors:
        best = min(floors, key=floors.get)
        out["floor"] = {"time_min_s": floors[best], "best_chunk": best, "per_chunk_s": floors}
    return out


# ---------------------------------------------------------------------------------------------- the run
def plan(scaling: str, providers: tuple[str, ...], head: bool = True) -> list[tuple[str, int, int, int]]:
    """(provider, n, h, v) runs: the side by side first, then the scaling grid (quick: a subset, see README)."""
    head = [(p, HEADLINE["n"], HEADLINE["h"], HEADLINE["v"]) for p in providers] if head else []
    grid: list[tuple[str, int, int, int]] = []
    if scaling == "full":
        grid = [(p, n, h, v) for h in SCALE_H for v in SCALE_V for n in SCALE_N for p in providers]
    elif scaling == "quick":
        for p in providers:
            streamed = ("chunked", "floor", "hidden-chunked")
            ns = SCALE_N if p in streamed else (512, 1024) if p in ("eager", "axolotl", "torch-lce") else ()
            grid += [(p, n, 256, QWEN_V) for n in ns]
            if p in ("chunked", "floor", "eager"):
                grid += [(p, 2048, 256, v) for v in SCALE_V if v != QWEN_V]
            if p in ("chunked", "floor"):
                grid.append((p, 2048, 1024, QWEN_V))
    seen = set() if head else {(p, HEADLINE["n"], HEADLINE["h"], HEADLINE["v"]) for p in providers}
    out = []
    for r in head + grid:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def run(runs, rounds: int, mem_cap_gib: float, chunked_chunks: list[int], quick: bool) -> list[dict]:
    """Peak memory: each run in its own child process. Time: one child per shape, providers alternating for
    ``rounds`` rounds. A failure or a skip is recorded with its reason, never hidden."""
    runs = list(runs) + [(f"chunked-c{c}", n, h, v) for c in chunked_chunks for n, h, v in
                         ((HEADLINE["n"], HEADLINE["h"], HEADLINE["v"]), (8192, 256, QWEN_V))]  # fmt: skip
    rows, t_start = [], time.perf_counter()
    for provider, n, h, v in runs:
        row = {"provider": provider, "n": n, "h": h, "v": v, "shape": peer_shape(n, h, v).name}
        need = est_bytes(_split(provider)[0], n, h, v)
        if need > mem_cap_gib * 2**30:
            row["skipped"] = f"needs ~{need / 2**30:.1f} GiB > the {mem_cap_gib:g} GiB cap (--mem-cap-gib)"
        elif provider != "floor":  # the floor's memory is its (N, C) chunk: not a figure anyone compares
            try:  # 20 GFLOP/s and 40x the floor before a peer counts as hung
                row.update(run_child(__file__, ["--one", provider, str(n), str(h), str(v)], 240 + 4e-8 * n * h * v))
            except RuntimeError as e:
                row["failed"] = str(e)
        rows.append(row)
        _print_row(row, time.perf_counter() - t_start, "memory")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        todo = [r for r in rows if r["shape"] == shape and "skipped" not in r and "failed" not in r]
        if not todo:
            continue
        n, h, v = todo[0]["n"], todo[0]["h"], todo[0]["v"]
        args = ["--time", str(n), str(h), str(v), "--providers", ",".join(r["provider"] for r in todo)]
        try:
            got = run_child(__file__, [*args, "--rounds", str(rounds)], 240 + 4e-8 * n * h * v * len(todo) * rounds)
        except RuntimeError as e:
            got = {r["provider"]: {"failed": f"timing: {e}"} for r in todo}
        for r in todo:
            r.update(got[r["provider"]])
            _print_row(r, time.perf_counter() - t_start, "time")
    _ratios(rows)
    for r in rows:
        if "time_min_s" in r:
            figs = {k: r.get(k) for k in ("time_min_s", "peak_extra_mib", "first_call_s", "ratio_to_chunked",
                                          "ratio_to_floor", "best_chunk")}  # fmt: skip
            # threads and rounds are figures (never gated), not params: a baseline then gates any run's memory
            figs.update(tokens_per_s=r["n"] / r["time_min_s"], torch_threads=THREADS, rounds=rounds)
            params = {"provider": r["provider"], "shape": r["shape"], "n": r["n"], "h": r["h"], "v": r["v"], "k": 64,
                      "temperature": 2.0, "seq_len": r["n"], "dtype": "float32"}  # fmt: skip
            record(SUITE, f"{r['shape']}/{r['provider']}/cpu", figs, params, device="cpu", quick=quick)
    return rows


def rows_from_results() -> list[dict]:
    """The side-by-side and scaling rows recorded in ``peers.json`` (every run so far, newest per shape/provider)."""
    from measure import load_results

    rows = []
    for name, e in load_results(results_dir() / f"{SUITE}.json")["entries"].items():
        p = e["params"]
        if not name.startswith("vs-floor/"):
            rows.append({**{k: p[k] for k in ("provider", "n", "h", "v", "shape")}, **e["figures"]})
            if "best_chunk" in rows[-1]:
                rows[-1]["best_chunk"] = int(rows[-1]["best_chunk"])
    _ratios(rows)
    return rows


def _print_row(r: dict, elapsed: float, phase: str) -> None:
    what = r.get("skipped") or r.get("failed")
    if what:
        body = f"{'SKIP' if 'skipped' in r else 'FAIL'} {what}"
    elif phase == "memory":
        body = f"+{r.get('peak_extra_mib', 0):7.0f} MiB (first call {r.get('first_call_s', 0):.2f} s)"
    else:
        body = f"{r['time_min_s']:8.2f} s (min of {len(r.get('times_s', [])) or 'its best chunk'})"
    print(f"[{elapsed:6.0f} s] {phase:6s} {r['shape']:20s} {r['provider']:14s} {body}", flush=True)


def _ratios(rows: list[dict]) -> None:
    by = {(r["shape"], r["provider"]): r for r in rows if "time_min_s" in r}
    for r in by.values():
        for ref, key in (("chunked", "ratio_to_chunked"), ("floor", "ratio_to_floor")):
            if (r["shape"], ref) in by:
                r[key] = r["time_min_s"] / by[(r["shape"], ref)]["time_min_s"]


# ---------------------------------------------------------------------------------------------- presentation
def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    mem = r.get("peak_extra_mib")
    return f"{r['time_min_s']:.2f} s" + ("" if mem is None else f", +{mem:,.0f} MiB")


def side_by_side_table(rows: list[dict]) -> str:
    """Markdown: the headline shape, one row per provider with both ratios and its semantic differences."""
    name = peer_shape(**HEADLINE).name
    lines = [
        "| provider | time (min) | x chunked | x floor | peak extra memory | semantics |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in (r for r in rows if r["shape"] == name):
        sem = SEMANTICS.get(r["provider"], f"ours, chunked with KDOptions.chunk_size={r['provider'][9:]}")
        if "time_min_s" not in r:
            why = ("not run: " + r["skipped"]) if "skipped" in r else ("FAILED: " + r.get("failed", "?"))
            lines.append(f"| {r['provider']} | - | - | - | - | {why}. {sem} |")
            continue
        mem = "-" if r.get("peak_extra_mib") is None else f"+{r['peak_extra_mib']:,.0f} MiB"
        extra = f" (best chunk {r['best_chunk']})" if "best_chunk" in r else ""
        lines.append(f"| {r['provider']} | {r['time_min_s']:.2f} s{extra} | {_f(r.get('ratio_to_chunked'))} | "
                     f"{_f(r.get('ratio_to_floor'))} | {mem} | {sem} |")  # fmt: skip
    return "\n".join(lines)


def growth_table(rows: list[dict]) -> str:
    """Markdown: time and memory per N at H=256, V=151,936, and the log-log slope of time in N (1 = linear)."""
    import math

    pts: dict[str, dict[int, dict]] = {}
    for r in rows:
        if "time_min_s" in r and r["h"] == 256 and r["v"] == QWEN_V and not r["provider"].startswith("chunked-c"):
            pts.setdefault(r["provider"], {})[r["n"]] = r
    ns = sorted({n for p in pts.values() for n in p})
    head = "| provider | " + " | ".join(f"N={n:,}" for n in ns) + " | time slope in N |"
    lines = [head, "|---|" + "---:|" * (len(ns) + 1)]
    for p, by_n in pts.items():
        cells = [_cell(by_n.get(n)) for n in ns]
        have = sorted(by_n)
        slope = (math.log(by_n[have[-1]]["time_min_s"] / by_n[have[0]]["time_min_s"]) / math.log(have[-1] / have[0])
                 if len(have) > 1 else None)  # fmt: skip
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {_f(slope)} |")
    return "\n".join(lines)


def vocab_table(rows: list[dict]) -> str:
    """Markdown: N=2048, time and memory per (H, V) for each provider measured there."""
    pts = {}
    for r in rows:
        if "time_min_s" in r and r["n"] == 2048 and not r["provider"].startswith("chunked-c"):
            pts.setdefault(r["provider"], {})[(r["h"], r["v"])] = r
    cols = sorted({c for p in pts.values() for c in p})
    lines = ["| provider | " + " | ".join(f"H={h} V={v:,}" for h, v in cols) + " |", "|---|" + "---:|" * len(cols)]
    for p, by in pts.items():
        cells = [_cell(by.get(c)) for c in cols]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    """Time and peak memory vs N (H=256, V=151,936) and time vs V (N=2048, H=256), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ok = [r for r in rows if "time_min_s" in r and not r["provider"].startswith("chunked-c")]
    for p in dict.fromkeys(r["provider"] for r in ok):
        by_n = sorted((r["n"], r) for r in ok if r["provider"] == p and r["h"] == 256 and r["v"] == QWEN_V)
        by_v = sorted((r["v"], r) for r in ok if r["provider"] == p and r["h"] == 256 and r["n"] == 2048)
        if by_n:
            axes[0].plot([n for n, _ in by_n], [r["time_min_s"] for _, r in by_n], marker="o", label=p)
            mem = [(n, r["peak_extra_mib"]) for n, r in by_n if r.get("peak_extra_mib") is not None]
            if mem and p != "floor":
                axes[1].plot([n for n, _ in mem], [max(m, 1) for _, m in mem], marker="o", label=p)
        if len(by_v) > 1:
            axes[2].plot([v for v, _ in by_v], [r["time_min_s"] for _, r in by_v], marker="o", label=p)
    labels = (("N (rows), H=256, V=151,936", "fwd+bwd time (s, min)"), ("N (rows), H=256, V=151,936",
              "peak extra RSS (MiB)"), ("V (vocabulary), N=2048, H=256", "fwd+bwd time (s, min)"))  # fmt: skip
    for ax, (xl, yl) in zip(axes, labels, strict=True):
        ax.set(xscale="log", yscale="log", xlabel=xl, ylabel=yl)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"KD loss fwd+bwd, fp32, k=64, T=2, {device_name('cpu')}, one process per point")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--providers", default=",".join(SIDE_BY_SIDE), help="comma list (default: %(default)s)")
    ap.add_argument("--scaling", choices=("none", "quick", "full"), default="quick")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timed rounds after the warm-up (min is kept)")
    ap.add_argument("--mem-cap-gib", type=float, default=8.0, help="skip runs estimated above this (default 8)")
    ap.add_argument("--chunked-chunks", default="", help="also run chunked at these KDOptions.chunk_size values")
    ap.add_argument("--no-side-by-side", action="store_true", help="scaling runs only (no rerun at N=2048)")
    ap.add_argument("--report", action="store_true", help="tables and plot from bench/results/peers.json, no runs")
    ap.add_argument("--one", nargs=4, metavar=("PROVIDER", "N", "H", "V"), help="child: peak memory of one call")
    ap.add_argument("--time", nargs=3, type=int, metavar=("N", "H", "V"), help="child: time --providers, alternating")
    ap.add_argument("--k", type=int, default=64, help="child --one: teacher top-k")
    ap.add_argument("--t", type=float, default=2.0, help="child --one: temperature")
    args = ap.parse_args(argv)
    providers = tuple(p for p in args.providers.split(",") if p)
    if args.one:
        p, n, h, v = args.one
        print(json.dumps(measure_memory(p, int(n), int(h), int(v), args.k, args.t)))
        return 0
    if args.time:
        print(json.dumps(time_shape(*args.time, list(providers), args.rounds)))
        return 0
    unknown = sorted(set(providers) - set(SIDE_BY_SIDE))
    if unknown:
        print(f"error: --providers: unknown {unknown}; known: {', '.join(SIDE_BY_SIDE)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    chunked_chunks = [int(c) for c in args.chunked_chunks.split(",") if c]
    if args.report:
        rows = rows_from_results()
    else:
        runs = plan(args.scaling, providers, head=not args.no_side_by_side)
        rows = run(runs, args.rounds, args.mem_cap_gib, chunked_chunks, args.scaling != "full")
    wall = time.perf_counter() - t0
    png = results_dir() / "peers.png"
    plot(rows, png)
    print(f"\n## Side by side ({device_name('cpu')}, N=2048, H=256, V=151,936, k=64, T=2, fp32)\n")
    print(side_by_side_table(rows))
    print("\n## Scaling in N (H=256, V=151,936)\n\n" + growth_table(rows))
    print("\n## N=2048 across H and V\n\n" + vocab_table(rows))
    print(f"\n{len(rows)} runs in {wall / 60:.1f} min; wrote {results_dir() / 'peers.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
