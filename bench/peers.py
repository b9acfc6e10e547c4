"""Side by side with the peers on CPU: time and peak extra memory of one KD forward + backward, each provider in its
own process, all on the same inputs, with every ratio to ours (chunked) and to the bare-GEMM floor.

    python bench/peers.py                      # side by side at N=2048 + the quick scaling subset (make bench-peers)
    python bench/peers.py --scaling full       # the whole N x V x H grid (hours on 2 cores; skips what cannot fit)
    python bench/peers.py --scaling none --providers chunked,floor --chunked-chunks 1024,2048
    python bench/peers.py --one chunked 2048 256 151936 --repeats 2      # one child measurement (JSON on stdout)

Each child builds the inputs (bench/shapes.py, seed 0), runs a tiny warm-up (8 rows: imports, library init; CCE
compiles here and again at full size), then one full call inside ``peak_memory`` (peak RSS above the RSS after
the inputs exist; its time is ``first_call_s``), then ``--repeats`` timed calls: ``time_min_s`` is their minimum.
The floor runs every vocabulary chunk of FLOOR_CHUNKS and keeps the best. Results: ``bench/results/peers.json``
(suite entries ``<shape>/<provider>/cpu``, gated by bench/check.py: memory always, time on dedicated devices)
and ``bench/results/peers.png``. Peers come from ``.peers/`` (``make bench-peers`` installs them there).
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

SIDE_BY_SIDE = ("chunked", "eager", *PEERS, "floor")
HEADLINE = dict(n=2048, h=256, v=QWEN_V)
SUITE = "peers"


# ---------------------------------------------------------------------------------------------- one child
def _rows(x: dict, r: int) -> dict:
    """The first ``r`` rows of an input dict (tiny warm-up): same head, same H and V."""
    out = {k: (t[:r] if k not in ("weight", "temperature") else t) for k, t in x.items()}
    out["hidden"] = x["hidden"][:r].detach().requires_grad_(True)
    return out


def measure_one(provider: str, n: int, h: int, v: int, repeats: int, chunks: list[int] | None, k: int = 64,
                t: float = 2.0) -> dict:  # fmt: skip
    """Child side: time and peak extra RSS of ``provider`` on ``peer_shape(n, h, v)`` in this fresh process."""
    import torch
    from kd_providers import make_fn
    from measure import peak_memory, time_calls
    from shapes import make_kd_inputs

    torch.set_num_threads(int(os.environ.get("SSB_BENCH_THREADS", "2")))
    x = make_kd_inputs(peer_shape(n, h, v, k, t), "cpu")
    out: dict = {}
    if provider == "floor":
        per = {}
        with peak_memory("cpu") as pm:
            for c in chunks or FLOOR_CHUNKS:
                fn = make_fn(x, "floor", c)
                per[c] = min(time_calls(fn, repeats + 1))
        best = min(per, key=per.get)
        out.update(time_min_s=per[best], best_chunk=best, per_chunk_s={str(c): t for c, t in per.items()})
        return {**out, "peak_extra_mib": pm.peak_mib, "method": pm.method}
    chunk = chunks[0] if chunks else None
    t0 = time.perf_counter()
    make_fn(_rows(x, 8), provider, chunk)()  # imports, library init, CCE's compile (not counted)
    out["warmup_s"] = time.perf_counter() - t0
    fn = make_fn(x, provider, chunk)
    t0 = time.perf_counter()
    with peak_memory("cpu") as pm:
        fn()
    out.update(first_call_s=time.perf_counter() - t0, peak_extra_mib=pm.peak_mib, method=pm.method)
    times = time_calls(fn, repeats) or [out["first_call_s"]]
    return {**out, "time_min_s": min(times), "times_s": times}


def vs_floor(n: int, h: int, v: int, chunks: list[int], rounds: int) -> dict:
    """Chunked (at each KDOptions.chunk_size in ``chunks``) against the floor (best of FLOOR_CHUNKS) in ONE process,
    calls alternating round by round so both see the same load; min per variant. The target's ratio."""
    import torch
    from kd_providers import make_fn
    from measure import time_calls
    from shapes import make_kd_inputs

    torch.set_num_threads(int(os.environ.get("SSB_BENCH_THREADS", "2")))
    x = make_kd_inputs(peer_shape(n, h, v), "cpu")
    fns = {"chunked": make_fn(x, "chunked")}  # the public API at its default chunk (4096)
    fns.update({f"chunked-c{c}": make_fn(x, "chunked", c) for c in chunks})
    fns.update({f"floor-c{c}": make_fn(x, "floor", c) for c in FLOOR_CHUNKS})
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += time_calls(fn, 1)
    best = {name: min(t) for name, t in times.items()}
    floor = min(t for name, t in best.items() if name.startswith("floor"))
    ratios = {name: t / floor for name, t in best.items() if not name.startswith("floor")}
    return {
        "shape": peer_shape(n, h, v).name,
        "rounds": rounds,
        "floor_s": floor,
        "min_s": best,
        "ratio_to_floor": ratios,
    }


# ---------------------------------------------------------------------------------------------- the run
def plan(scaling: str, providers: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
    """(provider, n, h, v) runs: the side by side first, then the scaling grid (quick: a subset, see README)."""
    head = [(p, HEADLINE["n"], HEADLINE["h"], HEADLINE["v"]) for p in providers]
    grid: list[tuple[str, int, int, int]] = []
    if scaling == "full":
        grid = [(p, n, h, v) for h in SCALE_H for v in SCALE_V for n in SCALE_N for p in providers]
    elif scaling == "quick":
        for p in providers:
            ns = SCALE_N if p in ("chunked", "floor") else (512, 1024) if p in ("eager", "axolotl", "torch-lce") else ()
            grid += [(p, n, 256, QWEN_V) for n in ns]
            if p in ("chunked", "floor", "eager"):
                grid += [(p, 2048, 256, v) for v in SCALE_V if v != QWEN_V]
            if p in ("chunked", "floor"):
                grid.append((p, 2048, 1024, QWEN_V))
    seen, out = set(), []
    for r in head + grid:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def run(runs, repeats: int, mem_cap_gib: float, chunked_chunks: list[int], quick: bool) -> list[dict]:
    """Each run in its own child process; a failure or a skip is recorded with its reason, never hidden."""
    rows = []
    runs = list(runs) + [(f"chunked-c{c}", n, h, v) for c in chunked_chunks for n, h, v in
                         ((HEADLINE["n"], HEADLINE["h"], HEADLINE["v"]), (8192, 256, QWEN_V))]  # fmt: skip
    t_start = time.perf_counter()
    for provider, n, h, v in runs:
        base, chunk = (provider.split("-c") + [""])[:2] if provider.startswith("chunked-c") else (provider, "")
        shape = peer_shape(n, h, v)
        row = {"provider": provider, "n": n, "h": h, "v": v, "shape": shape.name}
        need = est_bytes(base, n, h, v)
        if need > mem_cap_gib * 2**30:
            row["skipped"] = f"needs ~{need / 2**30:.1f} GiB > the {mem_cap_gib:g} GiB cap (--mem-cap-gib)"
        else:
            args = ["--one", base, str(n), str(h), str(v), "--repeats", str(repeats)]
            args += ["--chunks", chunk] if chunk else []
            timeout = 240 + 40 * (repeats + 2) * 4 * n * h * v / 20e9  # 20 GFLOP/s and 40x the floor: a hung peer
            try:
                row.update(run_child(__file__, args, timeout))
            except RuntimeError as e:
                row["failed"] = str(e)
        rows.append(row)
        _print_row(row, time.perf_counter() - t_start)
    _ratios(rows)
    for r in rows:
        if "time_min_s" in r:
            figs = {k: r.get(k) for k in ("time_min_s", "peak_extra_mib", "first_call_s", "ratio_to_chunked",
                                          "ratio_to_floor", "best_chunk")}  # fmt: skip
            figs["tokens_per_s"] = r["n"] / r["time_min_s"]
            params = {"provider": r["provider"], "shape": r["shape"], "n": r["n"], "h": r["h"], "v": r["v"], "k": 64,
                      "temperature": 2.0, "seq_len": r["n"], "repeats": repeats, "dtype": "float32"}  # fmt: skip
            record(SUITE, f"{r['shape']}/{r['provider']}/cpu", figs, params, device="cpu", quick=quick)
    return rows


def _print_row(r: dict, elapsed: float) -> None:
    what = r.get("skipped") or r.get("failed")
    body = f"SKIP {what}" if "skipped" in r else f"FAIL {what}" if "failed" in r else (
        f"{r['time_min_s']:8.2f} s  +{r['peak_extra_mib']:7.0f} MiB")  # fmt: skip
    print(f"[{elapsed:6.0f} s] {r['shape']:20s} {r['provider']:14s} {body}", flush=True)


def _ratios(rows: list[dict]) -> None:
    by = {(r["shape"], r["provider"]): r for r in rows if "time_min_s" in r}
    for r in by.values():
        for ref, key in (("chunked", "ratio_to_chunked"), ("floor", "ratio_to_floor")):
            if (r["shape"], ref) in by:
                r[key] = r["time_min_s"] / by[(r["shape"], ref)]["time_min_s"]


# ---------------------------------------------------------------------------------------------- presentation
def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


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
        mem = "-" if r["provider"] == "floor" else f"+{r['peak_extra_mib']:,.0f} MiB"
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
        cells = []
        for n in ns:
            r = by_n.get(n)
            cells.append("-" if r is None else f"{r['time_min_s']:.2f} s, +{r['peak_extra_mib']:,.0f} MiB")
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
        cells = [f"{by[c]['time_min_s']:.2f} s, +{by[c]['peak_extra_mib']:,.0f} MiB" if c in by else "-" for c in cols]
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
            if p != "floor":
                axes[1].plot([n for n, _ in by_n], [max(r["peak_extra_mib"], 1) for _, r in by_n], marker="o", label=p)
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
    ap.add_argument("--one", nargs=4, metavar=("PROVIDER", "N", "H", "V"), help="child mode: one measurement")
    ap.add_argument("--chunks", default="", help="child: vocabulary chunk(s) (chunked: 1, floor: several)")
    ap.add_argument("--k", type=int, default=64, help="child: teacher top-k")
    ap.add_argument("--t", type=float, default=2.0, help="child: temperature")
    ap.add_argument("--providers", default=",".join(SIDE_BY_SIDE), help="comma list (default: %(default)s)")
    ap.add_argument("--scaling", choices=("none", "quick", "full"), default="quick")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls after the measured first call")
    ap.add_argument("--mem-cap-gib", type=float, default=8.0, help="skip runs estimated above this (default 8)")
    ap.add_argument("--chunked-chunks", default="", help="also time chunked at these KDOptions.chunk_size values")
    ap.add_argument("--vs-floor", nargs=3, type=int, metavar=("N", "H", "V"),
                    help="chunked vs the floor in one process, alternating calls, with --chunked-chunks")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="--vs-floor: alternating rounds (min is kept)")
    args = ap.parse_args(argv)
    if args.vs_floor:
        chunks = [int(c) for c in args.chunked_chunks.split(",") if c]
        res = vs_floor(*args.vs_floor, chunks, args.rounds)
        for name, t in res["min_s"].items():
            ratio = res["ratio_to_floor"].get(name)
            print(f"{res['shape']} {name:16s} {t:8.3f} s" + (f"  {ratio:.3f}x the floor" if ratio else ""))
            figs = {"time_min_s": t, "ratio_to_floor": ratio}
            params = {"provider": name, "shape": res["shape"], "rounds": args.rounds, "mode": "vs-floor, one process"}
            record(SUITE, f"vs-floor/{res['shape']}/{name}/cpu", figs, params, device="cpu")
        return 0
    if args.one:
        p, n, h, v = args.one
        chunks = [int(c) for c in args.chunks.split(",") if c]
        print(json.dumps(measure_one(p, int(n), int(h), int(v), args.repeats, chunks, args.k, args.t)))
        return 0
    providers = tuple(p for p in args.providers.split(",") if p)
    unknown = sorted(set(providers) - set(SIDE_BY_SIDE))
    if unknown:
        print(f"error: --providers: unknown {unknown}; known: {', '.join(SIDE_BY_SIDE)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    chunked_chunks = [int(c) for c in args.chunked_chunks.split(",") if c]
    rows = run(plan(args.scaling, providers), args.repeats, args.mem_cap_gib, chunked_chunks, args.scaling != "full")
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
