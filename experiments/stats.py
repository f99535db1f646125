"""The statistics of the experiments' reports, on scipy, and the two noise rules they apply.

- Two top-1 values measured on the same n images (the demo's students) differ *beyond the noise* when a
  two-sided two-proportion z-test (pooled variance, each value a proportion of n independent images) gives
  p < SIGNIFICANCE. This counts only the sampling noise of the n images, not the spread between training
  seeds, so passing it is necessary for a ranking but not sufficient.
- Two rows trained with the same seeds (Fashion-MNIST) differ *beyond the noise* when the 95% Student t
  interval of their per-seed differences excludes zero. Same seed = same initialisation and data order,
  so the difference removes what the two runs share.
"""
import math
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from scipy.stats import binomtest, norm, t

SIGNIFICANCE = 0.05
CONFIDENCE = 0.95


def correct_count(acc1: float, n: int) -> int:
    """Number of correctly classified images behind a top-1 percentage measured on ``n`` images."""
    return int(round(acc1 * n / 100.0))


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> Tuple[float, float]:
    """Wilson score interval of ``correct`` out of ``n``, in percent."""
    if n <= 0:
        raise ValueError("n must be positive")
    interval = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return 100.0 * interval.low, 100.0 * interval.high


def two_proportion_p_value(correct_a: int, correct_b: int, n: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test of ``correct_a`` vs ``correct_b`` out of ``n`` each."""
    pooled = (correct_a + correct_b) / (2 * n)
    if pooled <= 0 or pooled >= 1:
        return 1.0  # both all wrong or both all right: no difference at all
    z = (correct_a - correct_b) / n / math.sqrt(pooled * (1 - pooled) * 2 / n)
    return float(2 * norm.sf(abs(z)))


def differ_beyond_the_noise(correct_a: int, correct_b: int, n: int) -> bool:
    """The first noise rule: the two-proportion z-test at p < SIGNIFICANCE."""
    return two_proportion_p_value(correct_a, correct_b, n) < SIGNIFICANCE


def format_p(p_value: float) -> str:
    """'p = 0.128', or 'p < 0.001'; three decimals, so a value just under 0.05 never prints as 0.05."""
    return "p < 0.001" if p_value < 0.001 else f"p = {math.floor(p_value * 1000) / 1000:.3f}"


def binomial_standard_error(acc1: float, n: int) -> float:
    """Standard error, in points, of one top-1 percentage measured on ``n`` images."""
    p = acc1 / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def mean_and_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean (None without values) and sample standard deviation (None below two values)."""
    mean = statistics.mean(values) if values else None
    return mean, statistics.stdev(values) if len(values) > 1 else None


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> List[float]:
    """Student t interval of the mean of ``values`` (two or more)."""
    mean, sd = mean_and_std(values)
    half = t.ppf((1 + confidence) / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return [mean - half, mean + half]


def paired_comparison(first: Dict[int, float], second: Dict[int, float]) -> dict:
    """The second noise rule on two rows' values by seed: the differences first - second over the seeds both
    have, their mean, sd and 95% t interval, and whether that interval excludes zero (None below two seeds)."""
    seeds = [seed for seed in first if seed in second]
    differences = [first[seed] - second[seed] for seed in seeds]
    mean, sd = mean_and_std(differences)
    interval = t_interval(differences) if len(differences) > 1 else None
    return {"seeds": seeds, "differences": differences, "mean": mean, "sd": sd, "ci95": interval,
            "exceeds_noise": None if interval is None else not interval[0] <= 0 <= interval[1]}
