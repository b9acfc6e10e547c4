"""Turn bench/results/*.json into the performance table of docs/PERFORMANCE.md (markdown) and a PNG plot.

    python bench/report.py                      # print the markdown table
    python bench/report.py --doc                # print the docs/PERFORMANCE.md section (table + notes) with its markers
    python bench/report.py --write              # rewrite docs/PERFORMANCE.md between its bench:start/end markers
    python bench/report.py --plot bench/results/bench.png   # tokens/s and peak memory vs sequence length

Every row names the hardware it came from (``meta.device``) and the commit. Only the marked section of the
document is ever rewritten; the markers are appended at its end when absent.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import check  # noqa: E402
import measure  # noqa: E402

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
OWN_TABLES = ("peers", "kd_auto")  # suites that print their own tables (bench/peers.py, bench/kd_auto.py)


@dataclass
class Row:
    source: str  # results file name
    name: str  # "suite/entry"
    entry: dict[str, Any]

    @property
    def params(self) -> dict[str, Any]:
        return self.entry.get("params", {})

    @property
    def figures(self) -> dict[str, float]:
        return self.entry["figures"]

    @property
    def meta(self) -> dict[str, Any]:
        return self.entry.get("meta", {})

    def first(self, pred) -> tuple[str, float] | None:
        return next(((k, v) for k, v in self.figures.items() if pred(k)), None)

    def tokens_per_s(self) -> float | None:
        hit = self.first(lambda k: k.endswith("tokens_per_s"))
        return hit[1] if hit else None

    def peak_mib(self) -> float | None:
        hit = self.first(lambda k: k.startswith("peak_") and check.kind(k) == "memory")
        if hit is None:
            return None
        k, v = hit
        if k.endswith(("_gib", "_gb")):
            return v * 1024
        return v / 2**20 if k.endswith("_bytes") else v


def load_rows(paths: list[Path]) -> list[Row]:
    """Rows from result files / folders (see ``check.load_set``: newest run per benchmark and device);
    unreadable or foreign files are named on stderr and skipped."""
    rows: list[Row] = []
    for p in paths:
        skipped: list[str] = []
        try:
            flat = check.load_set(p, skipped=skipped)
        except (OSError, ValueError) as e:
            skipped.append(str(e))
            flat = {}
        for msg in skipped:
            print(f"skipped {msg}", file=sys.stderr)
        rows.extend(Row(p.name, name, entry) for name, entry in flat.items() if name.split("/")[0] not in OWN_TABLES)
    return rows


def default_paths() -> list[str]:
    """bench/results and each folder in it (e.g. a bench/gpu.sh ``OUT`` folder copied back from a GPU machine)."""
    top = measure.results_dir()
    return [str(top), *(str(d) for d in sorted(top.iterdir()) if d.is_dir())] if top.is_dir() else [str(top)]


def seq_len(row: Row) -> int | None:
    """The sequence length of a row: ``seq_len``, or ``n`` (distilled rows) for the kernel suite."""
    v = row.params.get("seq_len", row.params.get("n"))
    return int(v) if isinstance(v, int | float) else None


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}{unit}" if abs(v) >= 100 else f"{v:.3g}{unit}"


def _others(row: Row) -> str:
    """Figures beyond tokens/s and peak memory, e.g. step time or store bytes per row."""
    skip = ("tokens_per_s", "peak_", "median", "warmup", "startup", "first_call")
    keep = [(k, v) for k, v in row.figures.items() if not any(s in k for s in skip) and check.kind(k) is not None]
    keep.sort(key=lambda kv: check.kind(kv[0]) != "capacity")  # max context first
    return ", ".join(f"{k} {_fmt(v)}" for k, v in keep[:3]) or "-"


def display_name(row: Row) -> str:
    """``kd/cpu-small-eager`` for a raw pytest-benchmark row, the ``suite/entry`` name otherwise."""
    suite = check.raw_suite(row.name)
    if suite is not None:
        test = row.name.partition("::")[2]
        return f"{suite}/{test.partition('[')[2].rstrip(']') or test}"
    return row.name


def table(rows: list[Row]) -> str:
    """The markdown performance table; one row per entry, each naming its hardware and commit."""
    head = "| benchmark | provider | seq len | tokens/s | peak memory | other | hardware | commit |"
    lines = [head, "|---|---|---:|---:|---:|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.meta.get("device_type") != "cuda", r.name)):
        p, m = r.params, r.meta
        mem = r.peak_mib()
        commit = (m.get("commit") or "?") + ("+" if m.get("dirty") else "")
        quick = " (quick)" if m.get("quick") else ""
        lines.append(
            f"| {display_name(r)}{quick} | {p.get('provider', '-')} | {seq_len(r) or '-'} | {_fmt(r.tokens_per_s())} | "
            f"{_fmt(mem, ' MiB')} | {_others(r)} | {m.get('device', '?')} | {commit} |"
        )
    return "\n".join(lines)


def doc_section(rows: list[Row], plot: str | None) -> str:
    gpu = any(r.meta.get("device_type") == "cuda" for r in rows)
    notes = [
        "Generated by `python bench/report.py --write` from `bench/results/*.json` "
        "(`make bench` on CPU, `bash bench/gpu.sh` on a GPU). `+` after a commit: uncommitted changes. "
        "CPU figures come from a shared machine: treat times as rough.",
    ]
    if not gpu:
        notes.append(
            "No GPU was lent while this was written: there are no GPU rows yet. `bash bench/gpu.sh` on a bare "
            "H100/H200 runs the GPU suite (480 s budget) and writes "
            "`bench/results/<device>-<commit>.{jsonl,json,md,log}`."
        )
    body = [START, "", table(rows), "", "\n\n".join(notes)]
    if plot:
        body += ["", f"![tokens/s and peak memory vs sequence length]({plot})"]
    return "\n".join([*body, "", END])


def write_doc(doc: Path, section: str) -> None:
    """Replace the marked section of ``doc`` (append markers at the end when absent); nothing else changes."""
    text = doc.read_text() if doc.exists() else ""
    if text.count(START) > 1 or text.count(END) > 1:
        raise ValueError(f"{doc}: more than one {START} / {END} marker")
    if START in text and END in text:
        pre, rest = text.split(START, 1)
        if END not in rest:
            raise ValueError(f"{doc}: {END} comes before {START}")
        post = rest.split(END, 1)[1]
        text = pre + section + post
    elif START in text or END in text:
        raise ValueError(f"{doc}: only one of {START} / {END} present; fix by hand")
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def plot(rows: list[Row], out: Path) -> int:
    """Two panels (tokens/s, peak MiB) vs seq_len; one line per suite/provider/device. Returns lines drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float | None, float | None]]] = {}
    for r in rows:
        if seq_len(r) is None:
            continue
        suite = display_name(r).split("/", 1)[0]
        # one line per model size: the kernel suite's shapes differ only in N (the x axis), so key on H x V there
        p = r.params
        shape = f"H{p['h']} V{p['v']}" if "h" in p and "v" in p else p.get("shape", "")
        key = f"{suite} {shape} {r.params.get('provider', '?')} [{r.meta.get('device', '?')}]".replace("  ", " ")
        series.setdefault(key, []).append((float(seq_len(r)), r.tokens_per_s(), r.peak_mib()))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, pts in sorted(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        ax1.plot(xs, [p[1] for p in pts], marker="o", label=key)
        ax2.plot(xs, [p[2] for p in pts], marker="o", label=key)
    for ax, label in ((ax1, "tokens/s"), (ax2, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if series:
        ax1.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return len(series)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", default=None, help="results files or folders (default: bench/results/ "
                    "and its sub-folders)")  # fmt: skip
    ap.add_argument("--doc", action="store_true", help="print the docs/PERFORMANCE.md section with its markers")
    ap.add_argument("--write", action="store_true", help="rewrite the marked section of docs/PERFORMANCE.md")
    ap.add_argument("--doc-path", default=str(measure.REPO / "docs" / "PERFORMANCE.md"))
    ap.add_argument("--plot", default=None, help="write the PNG plot here (e.g. bench/results/bench.png)")
    args = ap.parse_args(argv)
    args.results = args.results or default_paths()
    rows = load_rows([Path(p) for p in args.results])
    if not rows:
        print(f"error: no result entries in {args.results}; run `pytest bench --quick` first", file=sys.stderr)
        return 2
    plot_rel = None
    if args.plot:
        n = plot(rows, Path(args.plot))
        print(f"wrote {args.plot} ({n} lines)", file=sys.stderr)
        # linked from the document's folder: docs/ -> ../bench/results/...
        plot_rel = os.path.relpath(Path(args.plot).resolve(), Path(args.doc_path).resolve().parent)
    if not (args.doc or args.write):
        print(table(rows))
        return 0
    section = doc_section(rows, plot_rel)
    if args.write:
        write_doc(Path(args.doc_path), section)
        print(f"rewrote the bench section of {args.doc_path}", file=sys.stderr)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
