"""Confidence intervals for the rates and means the tables report.

An ASR is a share of k triggered images out of n sent to the target: its interval is Wilson's
score interval (sound near 0 and 1, where the normal approximation is not). A method's mean
ASR over triggers and seeds gets a percentile bootstrap interval over its runs.
"""
import math
from statistics import NormalDist

import numpy as np


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple:
    """(low, high) in [0, 1]: Wilson's score interval of a binomial share successes/trials."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes} of "
                         f"{trials}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    share = successes / trials
    centre = share + z * z / (2 * trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    scale = 1 + z * z / trials
    return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


def bootstrap_interval(values, confidence: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple:
    """(low, high): percentile bootstrap interval of the mean of `values` (seeded)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all():
        raise ValueError(f"need a non-empty 1-d array of finite values, got {values!r}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
