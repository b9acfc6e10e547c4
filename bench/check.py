"""Regression check: compare a results set with a saved baseline; exit 1 when a tracked figure worsened.

    python bench/check.py --save                      # bench/results/*.json -> bench/baselines/<device>.json
    python bench/check.py                             # compare bench/results/ with this machine's baseline
    python bench/check.py --baseline B.json --results R.json --time-margin 0.2 --memory-margin 0.05 --dedicated

Tracked figures are chosen by name (``figures`` of each entry, see bench/measure.py):
  memory      ``*memory*``, ``*_bytes``, ``*_mb``, ``*_mib``, ``*_gb``, ``*_gib``, ``bytes_per_*``
              lower is better, always gated
  capacity    ``max_seq_len*`` (largest length under a memory cap); higher is better, always gated (memory margin)
  throughput  ``*_per_s``; higher is better, time class
  time        ``*_s``, ``*_ms`` (not start-up costs: ``warmup_s``, ``first_call_s``...); lower is better, time class
The time class is gated only on a dedicated device: entries measured on CUDA (a lent GPU machine runs one
job), or every entry with ``--dedicated``; on a shared CPU time figures are reported, not gated
(``--no-time`` never gates them). A change is "worse by x" when new/base - 1 = x (lower-is-better) or
base/new - 1 = x (throughput), so both directions use the same margin. Entries are compared only when
their ``params`` and ``--quick`` flag match; the rest are listed as not comparable. Exit codes: 0 pass,
1 regression, 2 bad input (missing/malformed files, nothing comparable).

pytest-benchmark's own comparison also works on these suites; it gates the timer's statistics only (no memory,
no extra_info), per machine id (OS/Python), so use it on a dedicated device:
    pytest bench --quick --benchmark-storage=file://bench/baselines/pytest-benchmark --benchmark-save=<device>
    pytest bench --quick --benchmark-storage=file://bench/baselines/pytest-benchmark \
        --benchmark-compare --benchmark-compare-fail=min:10%
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402

UNGATED = (
    "warmup_s",
    "startup_s",
    "compile_s",
    "first_call_s",
    "*_median_s",
)  # start-up costs and the noisy median: report only


def kind(figure: str) -> str | None:
    """Figure class by name: "memory", "capacity", "throughput", "time", or None (not tracked)."""
    if figure.startswith("max_seq_len"):
        return "capacity"
    if (
        "memory" in figure
        or figure.endswith(("_bytes", "_mb", "_mib", "_gb", "_gib"))
        or figure.startswith("bytes_per_")
    ):
        return "memory"
    if figure.endswith("_per_s"):
        return "throughput"
    if figure.endswith(("_s", "_ms")) and not any(fnmatch.fnmatch(figure, p) for p in UNGATED):
        return "time"
    return None


def from_pytest_benchmark(data: dict[str, Any], *, skip_recorded: bool = False) -> dict[str, Any]:
    """A raw pytest-benchmark JSON (``pytest bench --benchmark-json``) as one suite: numeric ``extra_info``
    values that :func:`kind` tracks become figures (plus the timer's ``time_min_s``), the rest params.
    ``skip_recorded`` leaves out benchmarks that ``bench_record`` also wrote to a suite file."""
    ssb = data.get("ssb") or {}
    device = ssb.get("device") or data.get("machine_info", {}).get("device", "?")
    on_cpu = str(device).startswith("cpu") or str(device).endswith("(CPU)")
    meta = {"device": device, "device_type": "cpu" if on_cpu else "cuda",
            "commit": ssb.get("commit"), "quick": ssb.get("quick"), "time": data.get("datetime")}  # fmt: skip
    entries = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        if skip_recorded and "bench_suite" in info:
            continue
        figures = {k: v for k, v in info.items() if kind(k) and isinstance(v, int | float) and not isinstance(v, bool)}
        params = {k: v for k, v in info.items() if k not in figures and k not in ("device", "torch", "triton")}
        figures["time_min_s"] = b["stats"]["min"]
        entries[b.get("fullname") or b["name"]] = {"params": params, "figures": figures, "meta": meta}
    return {"suite": "pytest-benchmark", "entries": entries}


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e


def _is_raw(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("benchmarks"), list)


def load_set(path: str | Path, *, in_folder: bool = False, skipped: list[str] | None = None) -> dict[str, dict]:
    """Flatten results into ``{"suite/entry": entry}``: a folder, one suite file, a combined/baseline file, or a
    raw pytest-benchmark JSON.

    In a folder, raw pytest-benchmark files contribute only the benchmarks that did not also go through
    ``bench_record`` (no double counting); the same name from the same device keeps the newest entry (runs at
    several commits), and from another device both are kept, the later one as ``name@device``. Raw entries
    of a suite that also has a suite file there (same device type) are left out as older archives. With a
    ``skipped`` list, unreadable files in a folder are noted there instead of raising.
    """
    path = Path(path)
    if path.is_dir():
        out: dict[str, dict[str, Any]] = {}
        for f in sorted(path.glob("*.json")):
            try:
                flat = load_set(f, in_folder=True)
            except (OSError, ValueError) as e:
                if skipped is None:
                    raise
                skipped.append(str(e))
                continue
            for name, entry in flat.items():
                old = out.get(name)
                device = entry.get("meta", {}).get("device", "?")
                if old is not None and old.get("meta", {}).get("device", "?") != device:
                    name = f"{name}@{device}"
                    old = out.get(name)
                if old is None or str(entry.get("meta", {}).get("time")) >= str(old.get("meta", {}).get("time")):
                    out[name] = entry
        # a raw run of a suite is superseded by that suite's file for the same device type (older archives)
        have = {(k.split("/", 1)[0], e.get("meta", {}).get("device_type")) for k, e in out.items()}
        return {k: e for k, e in out.items() if (raw_suite(k), e.get("meta", {}).get("device_type")) not in have}
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such results file or folder")
    data = _read(path)
    if _is_raw(data):
        data = from_pytest_benchmark(data, skip_recorded=in_folder)
    if isinstance(data, dict) and isinstance(data.get("suites"), dict):
        suites = data["suites"]
    elif isinstance(data, dict) and isinstance(data.get("entries"), dict):
        suites = {data.get("suite") or path.stem: data}
    else:
        raise ValueError(f"{path}: expected {{'suite', 'entries'}} or {{'suites': {{...}}}}")
    out = {}
    for suite, body in suites.items():
        for name, entry in body.get("entries", {}).items():
            if not isinstance(entry, dict) or not isinstance(entry.get("figures"), dict):
                raise ValueError(f"{path}: entry {suite}/{name} has no 'figures' object")
            out[f"{suite}/{name}"] = entry
    return out


def raw_suite(name: str) -> str | None:
    """``kd`` for ``pytest-benchmark/bench/test_bench_kd.py::...``; None for suite-file names."""
    if not name.startswith("pytest-benchmark/"):
        return None
    return Path(name.removeprefix("pytest-benchmark/").partition("::")[0]).stem.removeprefix("test_bench_")


def load_many(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """:func:`load_set` over several files/folders; a later path's entry replaces an earlier one of that name."""
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        out.update(load_set(p))
    return out


def combine(paths: list[str | Path]) -> dict[str, Any]:
    """Everything :func:`load_many` reads, regrouped by suite as ``{"devices", "suites": {...}}`` (``--save``:
    the baseline file); loading the written file gives back the same ``suite/entry`` names."""
    suites: dict[str, dict[str, Any]] = {}
    for key, entry in load_many(paths).items():
        suite, name = key.split("/", 1)
        suites.setdefault(suite, {"suite": suite, "entries": {}})["entries"][name] = entry
    devices = sorted({e.get("meta", {}).get("device", "?") for s in suites.values() for e in s["entries"].values()})
    return {"devices": devices, "suites": suites}


def _is_peak(figure: str) -> bool:
    """Peak-memory figures (noisy on CPU) get the absolute slack; exact sizes such as ``bytes_per_row`` do not."""
    return figure.startswith("peak") or "memory" in figure


def _mib(figure: str, value: float) -> float:
    """A memory figure's value in MiB, from its unit suffix (bytes when none is given)."""
    for suffix, scale in (("_gib", 1024.0), ("_gb", 1024.0), ("_mib", 1.0), ("_mb", 1.0)):
        if figure.endswith(suffix):
            return value * scale
    return value / 2**20


def merge_worst(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Per tracked figure, the worse of two baselines (max time/memory, min throughput/capacity), entries and
    params permitting, so repeated ``--save --merge`` runs make a baseline that covers the run-to-run noise."""
    out = json.loads(json.dumps(new))
    for suite, body in old.get("suites", {}).items():
        for name, entry in body.get("entries", {}).items():
            cur = out["suites"].setdefault(suite, {"suite": suite, "entries": {}})["entries"].get(name)
            if cur is None:
                out["suites"][suite]["entries"][name] = entry
                continue
            if cur.get("params") != entry.get("params") or cur.get("meta", {}).get("quick") != entry.get(
                "meta", {}
            ).get("quick"):
                continue
            for fig, v in entry["figures"].items():
                k, c = kind(fig), cur["figures"].get(fig)
                if k is None or c is None:
                    continue
                cur["figures"][fig] = min(c, v) if k in ("throughput", "capacity") else max(c, v)
            cur["meta"]["merged_runs"] = cur["meta"].get("merged_runs", 1) + entry.get("meta", {}).get("merged_runs", 1)
    out["devices"] = sorted(set(old.get("devices", [])) | set(new.get("devices", [])))
    return out


@dataclass
class Row:
    entry: str
    figure: str
    kind: str
    base: float
    new: float
    worse_by: float  # > 0 means worse
    margin: float
    status: str  # "REGRESSED", "ok", "improved", "not gated"


def compare(
    base: dict[str, dict],
    new: dict[str, dict],
    *,
    time_margin: float = 0.10,
    memory_margin: float = 0.05,
    dedicated: bool = False,
    gate_time: bool = True,
    memory_slack_mib: float = 0.0,
) -> tuple[list[Row], list[str]]:
    """Rows for every tracked figure present in both sets, plus notes on entries that could not be compared.

    A memory figure regresses only when it grows by more than ``memory_margin`` AND more than
    ``memory_slack_mib`` (CPU peak RSS of a ~100 MiB block moves by a few MiB from run to run)."""
    rows: list[Row] = []
    notes: list[str] = []
    for name in sorted(base):
        b = base[name]
        if name not in new:
            notes.append(f"{name}: in the baseline, not in the new results")
            continue
        n = new[name]
        if b.get("params") != n.get("params") or b.get("meta", {}).get("quick") != n.get("meta", {}).get("quick"):
            notes.append(f"{name}: params or --quick differ from the baseline; not compared")
            continue
        device_type = n.get("meta", {}).get("device_type")
        time_gated = gate_time and (dedicated or device_type == "cuda")
        for fig, bv in sorted(b["figures"].items()):
            k = kind(fig)
            nv = n["figures"].get(fig)
            if k is None or nv is None or bv is None:
                continue
            if k in ("throughput", "capacity"):
                worse = (bv / nv - 1.0) if nv > 0 else float("inf")
            else:
                worse = (nv / bv - 1.0) if bv > 0 else (0.0 if nv <= bv else float("inf"))
            margin = memory_margin if k in ("memory", "capacity") else time_margin
            gated = k in ("memory", "capacity") or time_gated
            if not gated:
                status = "not gated"
            elif worse > margin and not (_is_peak(fig) and _mib(fig, nv - bv) <= memory_slack_mib):
                status = "REGRESSED"
            elif worse < -margin:
                status = "improved"
            else:
                status = "ok"
            rows.append(Row(name, fig, k, float(bv), float(nv), worse, margin, status))
    for name in sorted(set(new) - set(base)):
        notes.append(f"{name}: new entry, no baseline")
    return rows, notes


def table(rows: list[Row], *, everything: bool = False) -> str:
    """Markdown table of the rows that moved (|change| > 1%) or regressed; all rows with ``everything``."""
    shown = [r for r in rows if everything or r.status == "REGRESSED" or abs(r.worse_by) > 0.01]
    lines = ["| entry | figure | baseline | new | worse by | margin | status |", "|---|---|---:|---:|---:|---:|---|"]
    for r in shown:
        lines.append(f"| {r.entry} | {r.figure} | {r.base:.4g} | {r.new:.4g} | {r.worse_by:+.1%} | "
                     f"{r.margin:.0%} | {r.status} |")  # fmt: skip
    return "\n".join(lines) if shown else "(no tracked figure moved by more than 1%)"


def default_baseline() -> Path:
    """``bench/baselines/<device slug>.json`` (bench/hardware.py: ``amd-epyc-2-cores-cpu``)."""
    from hardware import device_slug

    return measure.BENCH_DIR / "baselines" / f"{device_slug()}.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--results",
        nargs="+",
        default=[str(measure.results_dir())],
        help="results folders/files (default: %(default)s)",
    )
    ap.add_argument("--baseline", default=None, help="baseline file (default: bench/baselines/<this device>.json)")
    ap.add_argument("--save", action="store_true", help="write the results as the baseline instead of comparing")
    ap.add_argument("--time-margin", type=float, default=0.10, help="allowed time/throughput worsening (0.10 = 10%%)")
    ap.add_argument("--memory-margin", type=float, default=0.05, help="allowed peak-memory worsening (0.05 = 5%%)")
    ap.add_argument("--merge", action="store_true", help="with --save: keep the worse of the old baseline and this run")
    ap.add_argument("--memory-slack-mib", type=float, default=32.0,
                    help="memory growth below this many MiB never fails (default %(default)s)")  # fmt: skip
    ap.add_argument("--dedicated", action="store_true", help="gate time figures of every entry (dedicated machine)")
    ap.add_argument("--no-time", action="store_true", help="never gate time figures (report them only)")
    ap.add_argument("--all", action="store_true", help="show every compared figure, not only those that moved")
    args = ap.parse_args(argv)
    baseline = Path(args.baseline) if args.baseline else default_baseline()
    try:
        if args.save:
            combined = combine(args.results)
            if not combined["suites"]:
                print(f"error: no results under {args.results}; run `pytest bench --quick` first", file=sys.stderr)
                return 2
            if args.merge and baseline.exists():
                combined = merge_worst(_read(baseline), combined)
            measure.write_json(baseline, combined)
            n = sum(len(s["entries"]) for s in combined["suites"].values())
            print(f"saved {n} entries from {len(combined['suites'])} suites to {baseline}")
            return 0
        base, new = load_set(baseline), load_many(args.results)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, notes = compare(base, new, time_margin=args.time_margin, memory_margin=args.memory_margin,
                          dedicated=args.dedicated, gate_time=not args.no_time,
                          memory_slack_mib=args.memory_slack_mib)  # fmt: skip
    print(f"baseline {baseline}  vs  results {' '.join(args.results)}\n")
    print(table(rows, everything=args.all))
    for note in notes:
        print(f"note: {note}")
    bad = [r for r in rows if r.status == "REGRESSED"]
    gated = sum(r.status != "not gated" for r in rows)
    print(f"\n{len(rows)} figures compared ({gated} gated), {len(bad)} regressed, {len(notes)} notes")
    if not rows:
        print("error: nothing comparable between baseline and results", file=sys.stderr)
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
