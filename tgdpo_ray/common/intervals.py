"""Intervals, one home for every interval we report, and how the reports print them. The percentile bootstrap: the
evaluation resamples questions, the credit-assignment experiment resamples seeds.

The unit resampled is a group (a question, a seed) holding totals; a statistic turns column totals summed over a
set of groups into a number, so a group's values always move together."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(groups: Sequence[Sequence[float]], statistic: Callable[[np.ndarray], np.ndarray],
                 samples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float | None, float | None, float | None]:
    """Point value and percentile bootstrap interval of a statistic of per-group totals.

    groups: one row per group, the group's totals (shape [n_groups, k]).
    statistic: maps totals summed over a set of groups, an array [..., k], to values [...].
    The draws are `np.random.default_rng(seed).integers(0, n_groups, size=(samples, n_groups))`: row s of that
    matrix picks the groups of bootstrap sample s, and everything a group holds moves with it.
    Returns (value, low, high) as floats, or (None, None, None) when there is no group.
    """
    totals = np.asarray(groups, dtype=float)
    if totals.size == 0:
        return None, None, None
    n_groups = totals.shape[0]
    value = statistic(totals.sum(axis=0))
    index = np.random.default_rng(seed).integers(0, n_groups, size=(samples, n_groups))
    resampled = statistic(totals[index].sum(axis=1))  # [samples, n_groups, k] -> [samples, k] -> [samples]
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(value), float(low), float(high)


def ratio(totals: np.ndarray) -> np.ndarray:
    """Column 0 over column 1: a sum of values over a count of values, i.e. their mean."""
    return totals[..., 0] / totals[..., 1]


def mean_interval(values: Sequence[float], samples: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """The mean of `values` and its bootstrap interval (each value is its own group)."""
    return bootstrap_ci([[value, 1.0] for value in values], ratio, samples, seed, level)


def interval_text(low: float, high: float, digits: int = 2, sign: bool = False) -> str:
    """An interval as the reports print it: "[low, high]", with a sign on each end when `sign`."""
    form = f"+.{digits}f" if sign else f".{digits}f"
    return f"[{low:{form}}, {high:{form}}]"
