"""What the terminal shows: third-party log levels (quiet unless ``--verbose``) and small aligned tables.

One place for both, so every stage prints the same way: ``ssb.cli`` calls :func:`quiet_libraries` once per
command, before any stage imports vLLM or bitsandbytes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence

VLLM_LEVEL = "WARNING"  # vLLM's start-up INFO lines (33-53 a run) only with --verbose

# bitsandbytes (>= 0.49, backends/cpu/ops.py) tries, on every AVX512-BF16 CPU, an optional faster 4-bit GEMM from
# the Hugging Face hub through the `kernels` package (`from kernels import get_kernel`), and logs a WARNING when
# that package is absent (always here: it downloads kernels at run time) before using its own CPU path, which is
# the one we test. Nothing is wrong, so the record is dropped; --verbose keeps it.
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_HUB_KERNEL_MSG = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropHubKernelProbe(logging.Filter):
    """Drops bitsandbytes' one "no hub kernel" record (see :data:`BNB_HUB_KERNEL_MSG`), passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_HUB_KERNEL_MSG)


class FirstOnly(logging.Filter):
    """Lets a log line through the first time its format string is seen: a run builds several vLLM engines
    (rollout, curate, eval) and each repeats vLLM's start-up warnings, some of them several times. Keyed on the
    unformatted message, so lines that differ only in their numbers count as repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _vllm_handler() -> logging.Handler:
    """Where vLLM's records go unless ``--verbose``: stderr, each line once, marked as vLLM's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vllm %(levelname)s: %(message)s"))
    handler.addFilter(FirstOnly())
    return handler


def quiet_libraries(verbose: bool = False) -> None:
    """vLLM at WARNING (an explicit ``VLLM_LOGGING_LEVEL`` wins) and bitsandbytes' hub-kernel probe silent, in this
    process and (through the environment) in the engine processes vLLM starts; ``verbose`` leaves both as they are.
    """
    if verbose:
        return
    # torch's C++ warnings, read when torch loads: vLLM's CPU worker prints its NUMA binding line once per engine
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # vLLM configures its logging anew for every engine (a fresh handler on stdout); with that off, its records
    # reach the one handler installed here, which keeps what it has seen across engines
    os.environ.setdefault("VLLM_LOGGING_LEVEL", VLLM_LEVEL)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    vllm = logging.getLogger("vllm")
    vllm.setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    if not any(isinstance(f, FirstOnly) for h in vllm.handlers for f in h.filters):
        vllm.addHandler(_vllm_handler())
        vllm.propagate = False
    # vLLM's Triton dispatcher reads torch.distributed.reduce_op while it scans modules: two FutureWarnings at import
    warnings.filterwarnings("ignore", message="`torch.distributed.reduce_op` is deprecated", category=FutureWarning)
    bnb = logging.getLogger(BNB_LOGGER)
    if not any(isinstance(f, _DropHubKernelProbe) for f in bnb.filters):
        bnb.addFilter(_DropHubKernelProbe())


def fmt_value(v: object) -> str:
    """A value for a table cell: floats to 4 significant digits, large integers with thousands separators."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    return str(v)


def table(rows: Sequence[Sequence[object]], header: Sequence[str] | None = None, indent: str = "") -> str:
    """Rows as left-aligned text columns (two spaces apart), with an optional header line and rule under it."""
    cells = [[fmt_value(c) for c in row] for row in rows]
    if header is not None:
        cells.insert(0, list(header))
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    if header is not None:
        lines.insert(1, indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def facts_table(facts: Mapping[str, object], indent: str = "  ") -> str:
    """A flat dict (a stage's facts) as a two-column table, one key a line."""
    return table([(k, v) for k, v in facts.items()], indent=indent)


def fmt_rate(x: float) -> str:
    """A rate rounded for reading: 1401.53 -> "1,402", 12.34 -> "12.3", 0.0123 -> "0.0123"."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_mb(mb: float | None) -> str:
    """A size given in MB (2**20 bytes) in the unit that reads best: "512 MB", "1.89 GB"; "n/a" when unknown."""
    if mb is None:
        return "n/a"
    return f"{mb:,.0f} MB" if mb < 1024 else f"{mb / 1024:,.2f} GB"
