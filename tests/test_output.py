"""What the terminal and the demo report show: quiet libraries, tables, rounded units, a legible chart, --version."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ssb.cli import MODELS_HEADER, build_parser, main
from ssb.core import output
from ssb.core.output import (
    BNB_HUB_KERNEL_MSG,
    BNB_LOGGER,
    FirstOnly,
    facts_table,
    fmt_mb,
    fmt_rate,
    quiet_libraries,
    table,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_bnb_logger(monkeypatch):
    """bitsandbytes' logger without our filter, restored afterwards; VLLM_LOGGING_LEVEL unset."""
    logger = logging.getLogger(BNB_LOGGER)
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.setattr(logging.getLogger("vllm"), "level", logging.NOTSET)
    return logger


class _Catch(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _probe_lines(logger: logging.Logger) -> list[str]:
    catch = _Catch()
    logger.addHandler(catch)
    try:  # the exact call bitsandbytes makes when `kernels` is absent, then an unrelated warning
        logger.warning(BNB_HUB_KERNEL_MSG + ": %s. Please make sure ...", "No module named 'kernels'")
        logger.warning("an unrelated bitsandbytes warning")
    finally:
        logger.removeHandler(catch)
    return catch.lines


def test_bitsandbytes_hub_kernel_probe_silenced(fresh_bnb_logger):
    assert len(_probe_lines(fresh_bnb_logger)) == 2
    quiet_libraries()
    quiet_libraries()  # idempotent: one filter
    assert _probe_lines(fresh_bnb_logger) == ["an unrelated bitsandbytes warning"]
    assert len(fresh_bnb_logger.filters) == 1


def test_verbose_keeps_everything(fresh_bnb_logger):
    quiet_libraries(verbose=True)
    assert len(_probe_lines(fresh_bnb_logger)) == 2 and "VLLM_LOGGING_LEVEL" not in os.environ
    assert build_parser().parse_args(["rollout", "--verbose"]).verbose
    assert not build_parser().parse_args(["rollout"]).verbose


def test_filter_matches_the_installed_bitsandbytes():
    """The filtered text is the one this bitsandbytes logs (read from its source: an upgrade that rewords it
    fails here, not silently in every stage's output)."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None:
        pytest.skip("bitsandbytes not installed")
    src = (Path(spec.origin).parent / "backends" / "cpu" / "ops.py").read_text()
    assert f'"{BNB_HUB_KERNEL_MSG}: %s' in src and "logging.getLogger(__name__)" in src
    assert BNB_LOGGER == "bitsandbytes.backends.cpu.ops"


PROBE_SCRIPT = """
import logging
from ssb.core.output import BNB_HUB_KERNEL_MSG, BNB_LOGGER, quiet_libraries
seen = []
logging.getLogger(BNB_LOGGER).addFilter(lambda r: seen.append(r.getMessage()) or True)  # runs before ours
quiet_libraries()
import bitsandbytes
print("probed" if any(m.startswith(BNB_HUB_KERNEL_MSG) for m in seen) else "no probe on this CPU")
"""


def test_importing_bitsandbytes_prints_no_probe_line():
    """The real import, from the repository root (where `import kernels` finds our kernels/ folder) as ssb runs:
    bitsandbytes logs its probe (on an AVX512-BF16 CPU) and nothing reaches the terminal."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    proc = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert BNB_HUB_KERNEL_MSG not in proc.stderr + proc.stdout
    print(proc.stdout.strip())  # "probed" here: the record was logged and dropped


def test_vllm_logs_at_warning_unless_asked(fresh_bnb_logger, monkeypatch):
    quiet_libraries()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"  # what vLLM reads when it configures its logger
    assert logging.getLogger("vllm").level == logging.WARNING  # and if it was configured already
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "debug")  # the user's explicit choice wins
    quiet_libraries()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "debug" and logging.getLogger("vllm").level == logging.DEBUG


def test_vllm_lines_pass_once_per_message(fresh_bnb_logger):
    vllm = logging.getLogger("vllm")
    for _ in range(2):  # installed once, however often the CLI asks
        quiet_libraries()
    [first_only] = [f for h in vllm.handlers for f in h.filters if isinstance(f, FirstOnly)]
    assert not vllm.propagate and os.environ["VLLM_CONFIGURE_LOGGING"] == "0"

    def rec(level, msg, *args):
        return logging.LogRecord("vllm.engine", level, __file__, 1, msg, args, None)

    assert first_only.filter(rec(logging.INFO, "Memory profiling took %.2f s", 1.23))
    assert not first_only.filter(rec(logging.INFO, "Memory profiling took %.2f s", 4.56))  # same line, other number
    assert first_only.filter(rec(logging.WARNING, "Memory profiling took %.2f s", 4.56))  # another level: another line
    assert first_only.filter(rec(logging.INFO, "another message"))


TOY_RUN = [
    "data.limit=8",
    "rollout.k=2",
    "curate.target_pairs=2",
    "curate.attempts=2",
    "capture.shard_examples=2",
    "train.max_steps=2",
    "train.batch_size=2",
    "eval.limit=2",
    "eval.n=1",
    "eval.bootstrap=10",
    "engine.cpu_kv_cache_gib=0.25",
    "curate.require_better_teacher=false",
]


def test_a_toy_run_repeats_no_warning_line(tmp_path):
    """``ssb run`` on the toy with vLLM (three engines in one process) prints each warning line at most once."""
    pytest.importorskip("vllm")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "TORCH_CPP"))}  # as a user's shell
    cmd = [sys.executable, "-m", "ssb", "run", "--config", "toy", "run_dir=run", *TOY_RUN]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any(line.startswith("[ssb run] eval") for line in lines)  # the whole run was seen
    warnings = [re.sub(r"\d+", "N", line) for line in lines if re.search(r"warn", line, re.IGNORECASE)]
    repeated = {line: n for line, n in Counter(warnings).items() if n > 1}
    assert not repeated, repeated


def test_tables_and_units():
    text = table([("a", 1234567, 0.000123456), ("bb", True, 3.0)], header=("name", "n", "x"))
    assert text.splitlines() == [
        "name  n          x",
        "----  ---------  ---------",
        "a     1,234,567  0.0001235",
        "bb    True       3",
    ]
    facts = facts_table({"dtype": "float32", "trainable_params": 1_327_104, "qlora": False, "resumed_from": None})
    assert facts.splitlines()[1] == "  trainable_params  1,327,104" and "{" not in facts
    assert [fmt_rate(x) for x in (1401.53, 12.345, 0.01234)] == ["1,402", "12.3", "0.0123"]
    assert [fmt_mb(x) for x in (1938.44921875, 512.4, None)] == ["1.89 GB", "512 MB", "n/a"]


def test_train_summary_is_a_table():
    src = (ROOT / "ssb" / "train" / "loop.py").read_text()
    assert "{facts_table(s.facts)}" in src and "{s.facts}" not in src


def _demo_report() -> dict:
    paired = {"benchmarks": {"toy": {"diff": 0.1, "diff_ci": (0.0, 0.2), "p_bootstrap": 0.04, "wins": 5}}}
    paired["benchmarks"]["toy"] |= {"losses": 1, "ties": 10, "p_sign": 0.2}
    return {
        "seed": 0,
        "benchmark": "toy",
        "protocol": {"name": "toy"},
        "ci95": {k: (0.1, 0.3) for k in ("base", "ssb", "sft", "rft")},
        "ssb_vs_base": paired,
        "ssb_vs_sft": paired,
        "ssb_vs_rft": paired,
        **{k: 0.2 for k in ("base_pass1", "ssb_pass1", "sft_pass1", "rft_pass1", "hinted_pass1")},
        "rft_examples": 9,
        "premise": {"line": "premise on 4 problems: hinted view better"},
        "trained_tokens": {"ssb": 1234567, "sft": 1234000, "rft": 1233000},
        "hinted_attempts": 8,
        "rounds": [{}],
        "pairs": 12,
        "curation": {"stop_reason": "exhausted"},
        "store_bytes_per_row": 612.3,
        "dense_bytes_per_row": 2048,
        "dense_bytes_per_row_qwen": 607744,
        "stage_seconds": {"rollout": 12.34},
        "tokens_per_s": {"rollout": 1401.5328, "train_ssb": 812.917, "train_sft": None},
        "train_peak_memory_mb": 1938.44921875,
        "process_max_rss_mb": 2431.2,
    }


def test_demo_report_rounds_its_units():
    from ssb.run.demo import render_markdown

    md = render_markdown(_demo_report(), "")
    assert "Throughput: rollout 1,402 tokens/s, train ssb 813 tokens/s." in md
    assert "Train peak memory 1.89 GB; process max RSS 2.37 GB." in md
    assert "Trained tokens: ssb 1,234,567, sft 1,234,000, rft 1,233,000." in md
    assert "{" not in md and "1938.4" not in md and "1401.5" not in md


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("values", [(0.3, 0.95, 0.9), (1.0, 1.0, 1.0)])
def test_chart_legend_covers_no_label(values):
    """The demo's three bars (base, SSB, SFT), high values included: the legend's box meets no bar, value label,
    tick label or title."""
    import matplotlib.pyplot as plt

    from ssb.eval.report import chart_figure

    def run(label: str, v: float) -> dict:
        agg = {"pass@k": {"1": {"value": v, "ci": (max(v - 0.1, 0.0), min(v + 0.05, 1.0))}}}
        return {"label": label, "protocol": {"name": "toy"}, "benchmarks": {"toy": {"aggregates": agg}}}

    labels = ("base student", "SSB student", "SFT control")
    fig = chart_figure([run(name, v) for name, v in zip(labels, values)])
    try:
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)  # constrained layout places everything at draw time
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        (ax,) = fig.axes
        others = [*ax.texts, *ax.get_xticklabels(), *ax.get_yticklabels(), ax.title, ax.xaxis.label, ax.yaxis.label]
        others += [p for p in ax.patches]
        for artist in others:
            if artist.get_visible() and (not hasattr(artist, "get_text") or artist.get_text()):
                assert not _boxes_overlap(box, artist.get_window_extent(renderer)), artist
        assert [t.get_text() for t in legend.get_texts()] == list(labels)
        assert box.y1 <= ax.get_window_extent(renderer).y0  # its own row under the axes
    finally:
        plt.close(fig)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("ssb ") and out != "ssb unknown", out


def test_models_list_has_a_header(capsys):
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == " ".join(MODELS_HEADER).split() and set(lines[1]) <= {"-", " "}
    assert any(line.startswith("smollm2-135m-instruct ") for line in lines[2:])
    assert output.table([]) == ""
