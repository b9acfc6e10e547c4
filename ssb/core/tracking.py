"""Experiment tracking: the figures ``metrics.jsonl`` holds, also sent to TensorBoard and/or Weights & Biases.

``train.report_to`` lists the trackers (``[]`` by default: ``metrics.jsonl`` only). ``tensorboard`` writes event
files under ``RUN_DIR/<train.output_subdir>/tb`` (``tensorboard --logdir RUN_DIR``), through torch's
``SummaryWriter`` (needs the ``tensorboard`` package). ``wandb`` logs to Weights & Biases when it is installed,
offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads later); its files go under the same
directory. Train steps are logged as ``train/<key>``; eval summaries as ``eval/<label>/<benchmark>/<metric>``.
Both the train loop and eval use :func:`open_tracker`, so the figures are the same wherever they are read.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ssb.core.config_rules import TRACKERS, ConfigError


class Tracker:
    """Fan-out of scalar logs to the chosen backends; a no-op when none is chosen."""

    def __init__(
        self, report_to: Sequence[str], log_dir: str | Path, *, run_name: str = "ssb", config: dict | None = None
    ):
        unknown = sorted(set(report_to) - set(TRACKERS))
        if unknown:
            raise ConfigError(
                f"train.report_to: unknown tracker(s) {unknown} (expected any of {list(TRACKERS)})", "train.report_to"
            )
        self.log_dir = Path(log_dir)
        self._tb = None
        self._wandb = None
        if "tensorboard" in report_to:
            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError(
                    "train.report_to: tensorboard is not installed (pip install tensorboard)", "train.report_to"
                )
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.log_dir / "tb"))
        if "wandb" in report_to:
            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("train.report_to: wandb is not installed (pip install wandb)", "train.report_to")
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # never reach the network unless the user says so
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project="ssb", name=run_name, dir=str(self.log_dir), config=config or {}, reinit=True
            )

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def log(self, scalars: Mapping[str, float], step: int, prefix: str = "train") -> None:
        """Log every numeric value of ``scalars`` (one metrics.jsonl record) as ``<prefix>/<key>`` at ``step``."""
        values = {f"{prefix}/{k}": float(v) for k, v in scalars.items() if _is_number(v)}
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def log_eval(self, results: dict, step: int = 0) -> None:
        """One eval ``results.json`` (:mod:`ssb.eval.scoring`): pass@k, maj@k and the rates per benchmark."""
        for bench, res in results.get("benchmarks", {}).items():
            self.log(
                eval_scalars(res.get("aggregates", {})), step, prefix=f"eval/{results.get('label', 'model')}/{bench}"
            )

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def eval_scalars(agg: dict) -> dict[str, float]:
    """The flat figures of one benchmark's aggregates: ``pass@1``, ``pass@n``, ``maj@n``, pass@1 per grading mode,
    token means and rates (the numbers of ``report.md``'s table, as fractions)."""
    out: dict[str, float] = {}
    for family in ("pass@k", "maj@k"):
        for k, v in agg.get(family, {}).items():
            out[f"{family[:-1]}{k}"] = v["value"]
    for mode, v in agg.get("pass@1_by_mode", {}).items():
        out[f"pass@1_{mode}"] = v["value"]
    for key in (
        "n_problems",
        "n_samples",
        "mean_tokens_correct",
        "mean_tokens_wrong",
        "truncation_rate",
        "truncated_right_answer_rate",
        "no_answer_rate",
    ):
        if _is_number(agg.get(key)):
            out[key] = agg[key]
    return out


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # NaN (no samples) is left out


def open_tracker(report_to: Sequence[str], log_dir: str | Path, *, run_name: str = "ssb", config: dict | None = None):
    """A :class:`Tracker` for ``train.report_to``, or None when the list is empty (nothing to import or open)."""
    if not report_to:
        return None
    return Tracker(report_to, log_dir, run_name=run_name, config=config)
