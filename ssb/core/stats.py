"""Confidence intervals shared by the stages that report rates (``ssb.eval`` over problems, ``ssb.curate``'s
premise report over problems): one percentile bootstrap, defined once."""

from __future__ import annotations

import math

import numpy as np

CI_LEVEL = 0.95


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = CI_LEVEL) -> list[float]:
    """Percentile bootstrap CI of the mean of per-problem ``values`` (problems resampled with replacement).

    Shape: values (P,) -> [lo, hi]. With P == 0 returns [nan, nan]; with P == 1 the interval is the point.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))  # (B, P)
    means = values[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return [float(lo), float(hi)]
