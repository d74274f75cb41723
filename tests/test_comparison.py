"""lorambo.comparison: the budget check, the interpolation to a target and the seed bootstrap of parameter savings,
on synthetic curves whose answer is known."""

import math
import random
import statistics

import pytest

from lorambo.report import comparison
from lorambo.report.comparison import BELOW_SWEEP, NOT_REACHED, params_to_reach, savings

BUDGETS = [10_000, 20_000, 40_000, 80_000]


def log_curve(x, slope=0.02, base=0.70):
    """A metric linear in log parameters: interpolation on log parameters is exact for it."""
    return base + slope * math.log(x / 10_000)


def test_interpolation_on_log_parameters_finds_the_known_crossing():
    curve = [(x, log_curve(x)) for x in BUDGETS]
    for x_star in (12_345, 30_000, 55_555, 79_999):
        assert params_to_reach(curve, log_curve(x_star), lower=False) == pytest.approx(x_star, rel=1e-9)
    # lower is better (perplexity falling with parameters)
    falling = [(x, 400 - 10 * math.log(x)) for x in BUDGETS]
    assert params_to_reach(falling, 400 - 10 * math.log(33_000), lower=True) == pytest.approx(33_000, rel=1e-9)


def test_interpolation_edges_and_the_first_crossing_of_a_noisy_curve():
    curve = [(x, log_curve(x)) for x in BUDGETS]
    assert params_to_reach(curve, log_curve(5_000), lower=False) == BELOW_SWEEP
    assert params_to_reach(curve, log_curve(10_000), lower=False) == BELOW_SWEEP  # reached at the first point
    assert params_to_reach(curve, log_curve(200_000), lower=False) == NOT_REACHED
    bumpy = [(10_000, 0.70), (20_000, 0.80), (40_000, 0.75), (80_000, 0.90)]
    # 0.78 is first reached between 10k and 20k (log-linear: 10k * 2^0.8), not after the dip
    assert params_to_reach(bumpy, 0.78, lower=False) == pytest.approx(10_000 * 2 ** 0.8, rel=1e-9)


def shifted(values_at, factor):
    """A curve that reaches at x what uniform reaches at factor * x: it needs 1/factor of uniform's parameters."""
    return [(x, values_at(factor * x)) for x in BUDGETS]


def with_noise(curve_fn, spread):
    """Seeds symmetric around the curve (their mean is the curve exactly)."""
    return [(x, [curve_fn(x) + d for d in (-spread, 0.0, spread)]) for x in BUDGETS]


def test_savings_of_a_curve_that_needs_half_the_parameters():
    uniform = with_noise(log_curve, 0.004)
    better = with_noise(lambda x: log_curve(2 * x), 0.004)
    rows = savings(uniform, better, "accuracy", resamples=500)
    assert [r["uniform_params"] for r in rows] == BUDGETS
    assert rows[0]["params"] == BELOW_SWEEP  # uniform's 10k is reached below the sweep's smallest budget
    for r in rows[2:]:
        assert r["ratio"] == pytest.approx(0.5, rel=1e-9)
        assert r["ratio_low"] < 0.5 < r["ratio_high"]
    worse = with_noise(lambda x: log_curve(x / 2), 0.004)  # needs twice uniform's parameters
    rows = savings(uniform, worse, "accuracy", resamples=500)
    assert [r["ratio"] for r in rows[:3]] == pytest.approx([2.0, 2.0, 2.0], rel=1e-9)
    assert rows[3]["params"] == NOT_REACHED and math.isinf(rows[3]["ratio"])


def test_without_seed_noise_the_interval_is_the_point_and_it_widens_with_noise():
    uniform = with_noise(log_curve, 0.0)
    better = with_noise(lambda x: log_curve(1.5 * x), 0.0)
    for r in savings(uniform, better, "accuracy", resamples=200)[2:]:
        assert r["ratio_low"] == pytest.approx(r["ratio"]) and r["ratio_high"] == pytest.approx(r["ratio"])
    widths = []
    for spread in (0.001, 0.004):
        r = savings(with_noise(log_curve, spread), with_noise(lambda x: log_curve(1.5 * x), spread), "accuracy",
                    resamples=1000)[2]
        widths.append(r["ratio_high"] - r["ratio_low"])
    assert 0 < widths[0] < widths[1]
    # noise on one side only still gives an interval: each curve's seeds are resampled
    r = savings(with_noise(log_curve, 0.004), better, "accuracy", resamples=500)[2]
    assert r["ratio_low"] < r["ratio"] < r["ratio_high"]


@pytest.mark.slow
def test_bootstrap_interval_covers_the_true_ratio_of_gaussian_seeds():
    """The percentile bootstrap over 5 seeds per budget covers the true savings ratio (0.5) in most of 60 synthetic
    experiments: a Monte Carlo check of the interval against the known answer (a 95% percentile interval with 5
    seeds under-covers somewhat; far below 80% would mean the resampling is wrong)."""
    rng = random.Random(1)
    covered = 0
    for _ in range(60):
        draw = lambda fn: [(x, [fn(x) + rng.gauss(0, 0.005) for _ in range(5)]) for x in BUDGETS]
        r = savings(draw(log_curve), draw(lambda x: log_curve(2 * x)), "accuracy", resamples=400,
                    seed=rng.randrange(10**6))[2]
        covered += r["ratio_low"] <= 0.5 <= r["ratio_high"]
    assert covered >= 48


def test_budget_check_both_ways_and_the_metric_direction():
    binds = comparison.budget_check([(10_000, [0.70, 0.71, 0.69]), (80_000, [0.80, 0.81, 0.79])], "accuracy")
    assert binds["binds"] is True and binds["p"] < 0.01 and binds["gain"] == pytest.approx(0.10)
    flat = comparison.budget_check([(10_000, [0.80, 0.79, 0.81]), (80_000, [0.805, 0.795, 0.80])], "accuracy")
    assert flat["binds"] is False and flat["p"] > 0.5
    # a clear change the wrong way (accuracy falls with capacity) is not capacity binding
    falls = comparison.budget_check([(10_000, [0.80, 0.81, 0.79]), (80_000, [0.70, 0.71, 0.69])], "accuracy")
    assert falls["binds"] is False
    # perplexity: lower is better, so falling with budget binds
    assert comparison.budget_check([(1, [380.0, 381.0, 379.0]), (2, [370.0, 371.0, 369.0])], "perplexity")["binds"]
    assert comparison.budget_check([(1, [0.8, 0.81])], "accuracy")["binds"] is None
    assert comparison.budget_check([(1, [0.8]), (2, [0.9, 0.91])], "accuracy")["binds"] is None


def test_mean_interval_brackets_the_mean_and_collapses_without_spread():
    values = [0.80, 0.82, 0.81, 0.79, 0.83]
    lo, hi = comparison.mean_interval(values)
    assert lo < statistics.mean(values) < hi and hi - lo < max(values) - min(values)
    assert comparison.mean_interval([0.8, 0.8, 0.8]) == (pytest.approx(0.8), pytest.approx(0.8))
