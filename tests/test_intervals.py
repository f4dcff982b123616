"""Small-sample statistics in tgdpo_ray/common/intervals.py: the Student-t quantile against published values, the
t interval's coverage against the percentile bootstrap's on a few values, and the exact sign-flip test."""

import numpy as np
import pytest

from tgdpo_ray.common.intervals import mean_interval, sign_flip_test, t_interval, t_quantile


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.7062047),
    (0.975, 4, 2.7764451),
    (0.975, 9, 2.2621572),
    (0.95, 7, 1.8945786),
])
def test_t_quantile_known_values(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-6)  # symmetric about 0


def test_t_quantile_tends_to_the_normal():
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)


def test_t_quantile_rejects_bad_arguments():
    for p, df in ((0.0, 3), (1.0, 3), (0.975, 0)):
        with pytest.raises(ValueError):
            t_quantile(p, df)


def test_t_interval_small_cases():
    assert t_interval([]) == (None, None, None)
    assert t_interval([4.0]) == (4.0, None, None)
    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: half width t_{0.975,2} / sqrt(3)
    assert mean == 2.0
    assert high - mean == pytest.approx(4.3026527 / np.sqrt(3), abs=1e-6)
    assert mean - low == pytest.approx(high - mean)
    assert t_interval([5.0, 5.0]) == (5.0, 5.0, 5.0)


TRUE_MEAN = 1.5


def normal_samples(n: int) -> np.ndarray:
    """4000 samples of n normal values each, the same every run."""
    return np.random.default_rng(20261207).normal(TRUE_MEAN, 2.0, size=(4000, n))


def coverage(intervals) -> float:
    return float(np.mean([low <= TRUE_MEAN <= high for _, low, high in intervals]))


@pytest.mark.parametrize("n", [3, 5, 8])
def test_t_interval_covers_the_mean_as_claimed(n):
    assert 0.935 <= coverage(t_interval(sample) for sample in normal_samples(n)) <= 0.965


def test_percentile_bootstrap_under_covers_three_values():
    # Why the t interval exists: on 3 values the bootstrap's "95%" interval covered the mean about 75% of the time
    # (it cannot see the spread the 3 values missed). 200 resamples keep the test quick; more change nothing here.
    assert coverage(mean_interval(sample, samples=200) for sample in normal_samples(3)) < 0.90


def test_sign_flip_known_cases():
    # The zeros flip to themselves; of the 8 sign assignments of 0.156, 0.75, 0.25 only all-positive reaches 1.156.
    assert sign_flip_test([0, 0.156, 0.75, 0.25, 0]) == 0.125
    assert sign_flip_test([1.0, 2.0, 0.5, 3.0, 0.1]) == 1 / 32
    assert sign_flip_test([0.0] * 5) == 1.0
    assert sign_flip_test([0.0] * 5, "two-sided") == 1.0


def test_sign_flip_alternatives():
    differences = [-1.0, -2.0, -0.5, -3.0, -0.1]
    assert sign_flip_test(differences, "less") == 1 / 32
    assert sign_flip_test(differences, "greater") == 1.0
    assert sign_flip_test(differences, "two-sided") == 2 / 32  # all negative, or all positive
    assert sign_flip_test([1.0, 2.0], "two-sided") == 0.5  # sums 3, 1, -1, -3: two are as far from 0 as 3


def test_sign_flip_counts_ties_despite_rounding():
    # Observed 0.3; an assignment reaches it when the differences it flips sum to 0 or less: none, -0.3 alone,
    # 0.1 and -0.3, 0.2 and -0.3, 0.3 and -0.3, 0.1, 0.2 and -0.3: 6 of 16. One of the ties comes out of
    # floating point a bit below 0.3; an exact comparison would give 5 / 16.
    assert sign_flip_test([0.1, 0.2, 0.3, -0.3]) == 6 / 16


def test_sign_flip_errors():
    for differences, alternative in (([], "greater"), ([1.0] * 21, "greater"), ([1.0, 2.0], "bigger"),
                                     ([1.0, float("nan")], "greater")):
        with pytest.raises(ValueError):
            sign_flip_test(differences, alternative)
    assert sign_flip_test([1.0] * 20) == 2.0 ** -20  # 20 values is still exact
