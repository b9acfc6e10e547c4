"""pytest plumbing for ``bench/``: ``--quick``, the ``bench`` marker on every item, GPU skips, result recording.

Use in a bench module::

    def test_x(benchmark, bench_record, quick):
        ...
        bench_record("kd", "eager/2048", {"tokens_per_s": tps, "peak_memory_mib": m.peak_mib},
                     {"provider": "eager", "seq_len": 2048}, device="cuda", benchmark=benchmark)

Helpers that are not fixtures (``peak_memory``, ``device_name``, ``sync``) live in ``bench/common.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import common` from bench modules and scripts

import common  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ssb bench")
    group.addoption("--quick", action="store_true", default=False,
                    help="small shapes / few rounds: the whole CPU suite in under 5 minutes")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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


@pytest.fixture(scope="session")
def quick(request: pytest.FixtureRequest) -> bool:
    """True under ``pytest bench --quick``."""
    return bool(request.config.getoption("--quick"))


@pytest.fixture(scope="session")
def bench_record(quick: bool):
    """``bench_record(suite, name, figures, params=None, *, device=None, benchmark=None)`` -> entry dict.

    Writes ``bench/results/<suite>.json`` atomically (see ``common.record``), with hardware, versions,
    commit and the ``--quick`` flag as metadata.
    """

    def rec(suite: str, name: str, figures: dict, params: dict | None = None, **kw):
        return common.record(suite, name, figures, params, quick=quick, **kw)

    return rec
