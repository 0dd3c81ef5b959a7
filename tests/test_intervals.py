"""Intervals on cases with known answers."""
import numpy as np
import pytest

from mesa_utils.intervals import bootstrap_interval, wilson_interval


@pytest.mark.parametrize("successes, trials, low, high", [
    (5, 10, 0.2366, 0.7634),        # textbook values of Wilson's 95% interval
    (0, 10, 0.0, 0.2775),           # an ASR of 0 still has an upper bound
    (10, 10, 0.7225, 1.0),
    (900, 1800, 0.4770, 0.5230),    # ~1,800 eval images: about +-2.3 points at 50%
])
def test_wilson_interval_known_values(successes, trials, low, high):
    got = wilson_interval(successes, trials)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_narrows_with_more_trials_and_rejects_nonsense():
    small, large = wilson_interval(18, 180), wilson_interval(180, 1800)
    assert large[1] - large[0] < small[1] - small[0]
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="trials > 0"):
        wilson_interval(0, 0)


def test_bootstrap_interval_matches_the_normal_theory_on_a_large_sample():
    values = np.random.default_rng(1).normal(10.0, 2.0, 400)
    low, high = bootstrap_interval(values, resamples=20_000)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))   # ~0.196
    assert low == pytest.approx(values.mean() - half, abs=0.02)
    assert high == pytest.approx(values.mean() + half, abs=0.02)


def test_bootstrap_interval_of_constant_values_is_a_point_and_is_seeded():
    assert bootstrap_interval([0.05] * 6) == pytest.approx((0.05, 0.05), abs=1e-12)
    assert bootstrap_interval([1, 2, 3, 9], seed=3) == bootstrap_interval([1, 2, 3, 9], seed=3)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_interval([0.1, float("nan")])
