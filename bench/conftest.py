"""Benchmark session setup: ``--quick``, results JSON under bench/results/, hardware/version/commit metadata.

Two result files per run, both naming the hardware:
- ``bench/results/<suite>.json`` (``bench_record`` fixture, see bench/common.py): one merged entry per
  benchmark with params / figures / meta; ``bench/check.py`` gates these and ``bench/report.py`` tabulates them.
- ``bench/results/<device>-<commit>.json``: the raw pytest-benchmark JSON of the run (unless
  ``--benchmark-json`` is given); figures are in each benchmark's ``extra_info``.

Every item under bench/ gets the ``bench`` marker; ``gpu``-marked items skip without CUDA. Use::

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

import common  # noqa: E402
from hardware import device_name, git_commit, versions  # noqa: E402

RESULTS_DIR = common.results_dir()


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False,
                     help="small shapes / few rounds: the whole CPU suite in under 5 minutes")  # fmt: skip


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # must run before pytest-benchmark builds its session, which reads --benchmark-json
    if getattr(config.option, "benchmark_json", "missing") is None and not config.option.collectonly:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        config.option.benchmark_json = RESULTS_DIR / f"{device_name()}-{git_commit()}.json"


def pytest_collection_modifyitems(config, items):
    bench_dir = Path(__file__).resolve().parent
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if bench_dir in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.bench)
            if "gpu" in item.keywords and not has_cuda:
                item.add_marker(skip_gpu)


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    machine_info["device"] = device_name()
    machine_info["threads"] = torch.get_num_threads()
    machine_info.update(versions())


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["ssb"] = {"device": device_name(), "commit": git_commit(), "quick": config.getoption("--quick")}


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """True under ``pytest bench --quick``."""
    return bool(request.config.getoption("--quick"))


@pytest.fixture(scope="session")
def bench_record(quick: bool):
    """``bench_record(suite, name, figures, params=None, *, device=None, benchmark=None)`` -> entry dict.

    Writes ``bench/results/<suite>.json`` atomically (``common.record``) with hardware, versions, commit and
    the ``--quick`` flag as metadata; with ``benchmark`` also fills its ``extra_info``.
    """

    def rec(suite: str, name: str, figures: dict, params: dict | None = None, **kw):
        return common.record(suite, name, figures, params, quick=quick, **kw)

    return rec
