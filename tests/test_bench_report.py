"""bench/report.py: the table names each row's hardware, only the marked section of docs/PERFORMANCE.md is
rewritten, PNG plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import report  # noqa: E402


def _results(tmp_path: Path) -> Path:
    entries = {}
    for dev, dtype in (("AMD EPYC, 2 cores (CPU)", "cpu"), ("NVIDIA H100 80GB HBM3", "cuda")):
        for provider in ("fused", "eager"):
            for n in (1024, 2048):
                entries[f"toy/{provider}/{n}/{dtype}"] = {
                    "params": {"provider": provider, "seq_len": n, "shape": "toy"},
                    "figures": {"tokens_per_s": 1000.0 / n, "peak_memory_gib": n / 4096, "step_time_s": n / 1000},
                    "meta": {"device": dev, "device_type": dtype, "commit": "abc1234", "dirty": False, "quick": True},
                }
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps({"suite": "train", "entries": entries}))
    (folder / "old.json").write_text(json.dumps({"flat": {"no": "entries"}}))  # skipped with a message
    return folder


def test_table_names_hardware_on_every_row(tmp_path, capsys):
    rows = report.load_rows([_results(tmp_path)])
    assert len(rows) == 8 and "skipped" in capsys.readouterr().err
    lines = report.table(rows).splitlines()[2:]
    assert len(lines) == 8
    assert all(("AMD EPYC" in line) != ("H100" in line) for line in lines)
    assert "H100" in lines[0]  # GPU rows first
    gib_row = next(line for line in lines if "toy/eager/2048/cuda" in line)
    assert "512 MiB" in gib_row  # 0.5 GiB shown in MiB


def test_write_rewrites_only_the_marked_section(tmp_path):
    doc = tmp_path / "docs" / "PERFORMANCE.md"
    doc.parent.mkdir()
    doc.write_text("# Title\n\nlead's text\n")
    res = _results(tmp_path)
    assert report.main([str(res), "--write", "--doc-path", str(doc)]) == 0
    first = doc.read_text()
    assert first.startswith("# Title\n\nlead's text\n\n" + report.START) and first.rstrip().endswith(report.END)
    doc.write_text(first.replace("lead's text", "lead's edited text") + "\nmore lead text after\n")
    plot = tmp_path / "results" / "bench.png"
    assert report.main([str(res), "--write", "--doc-path", str(doc), "--plot", str(plot)]) == 0
    second = doc.read_text()
    assert second.count(report.START) == 1 and "lead's edited text" in second
    assert second.endswith("more lead text after\n")
    assert "](../results/bench.png)" in second  # the plot is linked from the document's own folder


def test_the_default_document_is_docs_performance_and_its_section_is_current():
    """The generated section in docs/PERFORMANCE.md is what bench/results/ gives today (README has no table)."""
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "PERFORMANCE.md").read_text()
    assert report.START not in (repo / "README.md").read_text()
    rows = report.load_rows([Path(p) for p in report.default_paths()])
    assert report.doc_section(rows, None) in text


def test_a_lone_marker_is_refused(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(f"text\n{report.START}\n")
    with pytest.raises(ValueError, match="only one"):
        report.write_doc(doc, "x")


def test_plot_draws_one_line_per_provider_and_device(tmp_path):
    out = tmp_path / "plot.png"
    assert report.plot(report.load_rows([_results(tmp_path)]), out) == 4
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
