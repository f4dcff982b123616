"""Intervals, one home for every interval we report, and how the reports print them.

The percentile bootstrap, for many groups: the evaluation resamples questions. The unit resampled is a group (a
question) holding totals; a statistic turns column totals summed over a set of groups into a number, so a group's
values always move together.

For a handful of values (a few seeds, a few runs) the bootstrap's interval is too narrow: its "95%" interval of 3
normal values covers their mean about 75% of the time (tests/test_intervals.py). There, `t_interval` gives the
Student-t interval (its quantile from `t_quantile`, no scipy needed) and `sign_flip_test` an exact paired test."""

from __future__ import annotations

import functools
import math
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


# --- small samples: Student's t and the sign-flip test ------------------------------------------------------------


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # The fraction converges fast only for x below (a + 1) / (a + b + 2); above it, use I_x(a, b) = 1 - I_1-x(b, a).
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _regularized_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300  # keeps Lentz's denominators away from zero
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        # Each m adds two terms of the fraction: an even one, then an odd one.
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            c = 1.0 + numerator / c
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = c if abs(c) > tiny else tiny
            step = c * d
            fraction *= step
        if abs(step - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    # P(|T| > |t|) = I_x(df / 2, 1 / 2) with x = df / (df + t^2); each tail holds half of it.
    tails = _regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tails / 2.0 if t >= 0 else tails / 2.0


@functools.lru_cache(maxsize=None)  # the same few quantiles are asked for again and again
def t_quantile(p: float, df: int) -> float:
    """The p quantile of Student's t with df degrees of freedom: the t with P(T <= t) = p, to within 1e-9.

    The CDF comes from the regularized incomplete beta function; the quantile is found by bisection."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"t_quantile: df must be at least 1, got {df}")
    if p < 0.5:  # the distribution is symmetric about 0
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:  # widen until the quantile is bracketed (df = 1 has heavy tails)
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = (low + high) / 2.0
        if _t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


def t_interval(values: Sequence[float], level: float = 0.95
               ) -> tuple[float | None, float | None, float | None]:
    """The mean of `values` and its Student-t interval: mean +- t_{(1 + level) / 2, n - 1} * sd / sqrt(n), with sd
    the sample standard deviation (ddof 1). For few values (a handful of seeds or runs), where a bootstrap interval
    is too narrow. Returns (mean, low, high); (None, None, None) without values, (value, None, None) with one."""
    array = np.asarray(values, dtype=float)
    n = array.size
    if n == 0:
        return None, None, None
    mean = float(array.mean())
    if n == 1:  # one value has no spread to measure
        return mean, None, None
    half_width = t_quantile((1.0 + level) / 2.0, n - 1) * float(array.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half_width, mean + half_width


SIGN_FLIP_LIMIT = 20  # 2**20 sign assignments, about a million: a few tens of MB at most


def sign_flip_test(differences: Sequence[float], alternative: str = "greater") -> float:
    """Exact p-value of the paired sign-flip (randomization) test that the mean difference is 0.

    Under that hypothesis each difference is as likely to have either sign, so every one of the 2**n sign
    assignments is equally likely. The p-value is the fraction of assignments whose sum is at least the observed
    sum ("greater"), at most it ("less"), or at least as far from 0 ("two-sided"). Ties count as extreme.
    Raises ValueError without differences, with more than 20, or with a non-finite one."""
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"sign_flip_test: alternative must be greater, less or two-sided, got {alternative!r}")
    values = np.asarray(differences, dtype=float).ravel()
    n = values.size
    if n == 0:
        raise ValueError("sign_flip_test: no differences")
    if n > SIGN_FLIP_LIMIT:
        raise ValueError(f"sign_flip_test: {n} differences; exact enumeration stops at {SIGN_FLIP_LIMIT}")
    if not np.all(np.isfinite(values)):
        raise ValueError("sign_flip_test: differences must be finite")
    observed = float(values.sum())
    # Assignment k flips difference i when bit i of k is set: its sum is the observed sum less twice the flipped
    # values. One column at a time keeps memory at one float per assignment.
    assignments = np.arange(2 ** n)
    sums = np.full(2 ** n, observed)
    for i, value in enumerate(values):
        sums -= 2.0 * value * ((assignments >> i) & 1)
    # Sums that are equal in exact arithmetic can differ in their last bits: a tolerance (1e-12 for values of order
    # 1, growing with their size) makes such ties count as extreme.
    tolerance = 1e-12 * max(1.0, float(np.abs(values).sum()))
    if alternative == "greater":
        extreme = sums >= observed - tolerance
    elif alternative == "less":
        extreme = sums <= observed + tolerance
    else:
        extreme = np.abs(sums) >= abs(observed) - tolerance
    return float(extreme.mean())
