"""experiments.stats: Wilson intervals, the two-proportion z-test, paired t intervals, against closed forms
and scipy's own tests."""
import math

import pytest
from scipy.stats import ttest_1samp

from experiments import stats

N = 360


def percent(correct: int, n: int = N) -> float:
    return 100.0 * correct / n


def test_wilson_interval_matches_the_closed_form():
    low, high = stats.wilson_interval(332, N)
    assert low == pytest.approx(88.9886, abs=1e-3) and high == pytest.approx(94.5642, abs=1e-3)
    # 0 of n: [0, z^2 / (n + z^2)]
    z2 = 1.959963984540054 ** 2
    assert stats.wilson_interval(0, N) == pytest.approx((0.0, 100 * z2 / (N + z2)))
    # symmetric under swapping right and wrong; always contains the observed proportion
    for correct in (0, 1, 100, 180, 300, 359, 360):
        low, high = stats.wilson_interval(correct, N)
        mirror_low, mirror_high = stats.wilson_interval(N - correct, N)
        assert (low, high) == pytest.approx((100 - mirror_high, 100 - mirror_low))
        assert low - 1e-9 <= percent(correct) <= high + 1e-9
    with pytest.raises(ValueError):
        stats.wilson_interval(0, 0)


def test_two_proportion_test_on_the_demo_readme_numbers():
    # 342 vs 332 of 360: pooled p = 674/720, z = (10/360) / sqrt(p (1 - p) 2/360) = 1.524
    assert stats.two_proportion_p_value(342, 332, N) == pytest.approx(0.1275, abs=5e-4)
    assert stats.two_proportion_p_value(332, 342, N) == stats.two_proportion_p_value(342, 332, N)
    assert stats.two_proportion_p_value(286, 115, N) < 1e-30      # 79% vs 32% after 3 epochs
    assert stats.two_proportion_p_value(300, 300, N) == 1.0
    assert stats.two_proportion_p_value(360, 360, N) == 1.0 and stats.two_proportion_p_value(0, 0, N) == 1.0
    # where the rule switches at n = 360 and 93%: 14 images apart is beyond the noise, 13 is not
    assert stats.differ_beyond_the_noise(342, 328, N) and not stats.differ_beyond_the_noise(342, 329, N)
    # the normal tail by hand
    z = (342 - 332) / N / math.sqrt(674 / 720 * 46 / 720 * 2 / N)
    assert stats.two_proportion_p_value(342, 332, N) == pytest.approx(math.erfc(z / math.sqrt(2)))


def test_p_values_print_with_three_decimals_rounded_down():
    assert stats.format_p(0.1275) == "p = 0.127"
    assert stats.format_p(0.04999) == "p = 0.049"
    assert stats.format_p(0.0004) == "p < 0.001"
    assert stats.format_p(1.0) == "p = 1.000"


def test_counts_and_binomial_standard_error():
    assert stats.correct_count(percent(331), N) == 331
    assert stats.binomial_standard_error(90.0, 10000) == pytest.approx(0.3)
    assert stats.mean_and_std([]) == (None, None)
    assert stats.mean_and_std([2.0]) == (2.0, None)
    assert stats.mean_and_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))


def test_paired_comparison_interval_agrees_with_scipys_t_test():
    result = stats.paired_comparison({0: 90.0, 1: 91.0, 2: 92.5}, {0: 89.0, 1: 89.5, 2: 90.5})
    assert result["seeds"] == [0, 1, 2] and result["differences"] == pytest.approx([1.0, 1.5, 2.0])
    assert result["mean"] == pytest.approx(1.5) and result["sd"] == pytest.approx(0.5)
    reference = ttest_1samp([1.0, 1.5, 2.0], 0).confidence_interval(0.95)
    assert result["ci95"] == pytest.approx([reference.low, reference.high])
    assert result["ci95"][1] - 1.5 == pytest.approx(4.302653 * 0.5 / math.sqrt(3), rel=1e-6)
    assert result["exceeds_noise"] is True
    spanning = stats.paired_comparison({0: 90.0, 1: 91.0, 2: 92.5}, {0: 91.0, 1: 90.0, 2: 91.5})
    assert spanning["differences"] == pytest.approx([-1.0, 1.0, 1.0]) and spanning["exceeds_noise"] is False


def test_paired_comparison_uses_only_seeds_both_rows_have():
    result = stats.paired_comparison({0: 90.0, 2: 91.0}, {0: 89.0, 1: 89.5, 2: 90.5})
    assert result["seeds"] == [0, 2] and result["differences"] == pytest.approx([1.0, 0.5])
    single = stats.paired_comparison({1: 90.0}, {0: 89.0, 1: 89.5})
    assert single["differences"] == [0.5] and single["sd"] is None
    assert single["ci95"] is None and single["exceeds_noise"] is None
    empty = stats.paired_comparison({}, {0: 89.0})
    assert empty["mean"] is None and empty["exceeds_noise"] is None

