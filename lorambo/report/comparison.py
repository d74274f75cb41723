"""Statistics of a comparison between table rows: Welch's test over seeds; and what a budget sweep says about
allocation: does uniform's metric move with the budget at all (if not, capacity does not bind and no allocator
can show anything), and how many adapter parameters each allocator needs to reach
uniform's metric at each of uniform's budgets (parameter savings at equal quality).

Pure functions over run records (report.load_run's dicts); report.py prints and draws them. Hand-written: no
library interpolates a noisy metric-against-budget curve to a target with a seed bootstrap.
"""

import math
import random
import statistics

from lorambo.tuning import LOWER_IS_BETTER

BELOW_SWEEP = 0.0        # the smallest budget of the sweep already reaches the target
NOT_REACHED = math.inf   # no budget of the sweep reaches it, and the curve does not cross it in between


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value, or None with fewer than two seeds on a side or no spread at all."""
    if len(a) < 2 or len(b) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return None
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER or metric.split("_")[0] in LOWER_IS_BETTER  # loss_matched: MNLI's split


def curve_name(m: dict) -> str | None:
    """The allocator curve a run belongs to (its allocator, with the method and scale policy where they are not
    LoRA's matched default), or None for a run without an adapter budget (full fine-tuning, an optimizer row)."""
    if m["budget"] is None or m.get("optimizer", "adamw") != "adamw":
        return None
    name = m["allocator"]
    if m.get("method", "lora") not in ("lora", "growth", "adalora"):
        name = f"{m['method']}:{name}"
    scaling = m.get("lora_scaling")
    if scaling not in (None, "matched") and m["allocator"] != "uniform":
        name += f" [{scaling}]"
    return name


def sweep_curves(runs: list[dict]) -> dict[tuple, dict[str, list[tuple[float, list[float]]]]]:
    """{(model, task, metric): {curve: [(adapter parameters, [metric per seed]) by increasing parameters]}}:
    one point per budget label, at the mean adapter parameter count its runs really had."""
    points = {}
    for m in runs:
        curve = curve_name(m)
        if curve is None:
            continue
        for metric in m["reported_metrics"]:
            if m.get(metric) is not None:
                points.setdefault((m["model"], m["task"], metric), {}).setdefault(curve, {}).setdefault(
                    m["budget"], []).append((m["adapter_params"], m[metric]))
    curves = {}
    for table, by_curve in points.items():
        for curve, by_budget in by_curve.items():
            pts = [(statistics.mean(p for p, _ in items), [v for _, v in items]) for items in by_budget.values()]
            curves.setdefault(table, {})[curve] = sorted(pts)
    return curves


def budget_check(uniform: list[tuple[float, list[float]]], metric: str, alpha: float = 0.05) -> dict:
    """Uniform's metric at its smallest and largest budget, with Welch's test over seeds: `binds` is True when the
    difference is beyond seed noise (p < alpha) in the direction more capacity should go, False when it is not,
    None when it cannot be told (one budget, or fewer than two seeds at either end)."""
    result = {"budgets": len(uniform), "binds": None, "p": None}
    if len(uniform) < 2:
        return result
    (p_small, small), (p_large, large) = uniform[0], uniform[-1]
    gain = statistics.mean(large) - statistics.mean(small)
    p = welch_p(large, small)
    result.update(small_params=p_small, large_params=p_large, small=statistics.mean(small),
                  large=statistics.mean(large), gain=gain, p=p)
    if len(small) >= 2 and len(large) >= 2:
        better = gain < 0 if lower_is_better(metric) else gain > 0
        result["binds"] = bool(p is not None and p < alpha and better)
    return result


def params_to_reach(curve: list[tuple[float, float]], target: float, lower: bool) -> float:
    """The adapter parameters at which the piecewise-linear curve (metric against log parameters, points by
    increasing parameters) first reaches `target`: BELOW_SWEEP when its first point already does, NOT_REACHED
    when no point does."""
    reached = (lambda y: y <= target) if lower else (lambda y: y >= target)
    if reached(curve[0][1]):
        return BELOW_SWEEP
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if reached(y1):
            t = (target - y0) / (y1 - y0)   # y1 != y0: y0 misses the target and y1 reaches it
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return NOT_REACHED


def savings(uniform: list[tuple[float, list[float]]], other: list[tuple[float, list[float]]], metric: str,
            resamples: int = 2000, level: float = 0.95, seed: int = 0) -> list[dict]:
    """For each of uniform's budgets: the parameters `other` needs to reach uniform's mean metric there, their ratio
    to uniform's parameters, and a percentile bootstrap interval of that ratio (seeds resampled with replacement
    within every budget of both curves, independently)."""
    lower = lower_is_better(metric)
    rng = random.Random(seed)

    def needed(u_values, o_values):
        other_curve = [(x, statistics.mean(v)) for (x, _), v in zip(other, o_values)]
        return [params_to_reach(other_curve, statistics.mean(v), lower) for v in u_values]

    point = needed([v for _, v in uniform], [v for _, v in other])
    draws = []
    for _ in range(resamples):
        resample = lambda values: [rng.choice(values) for _ in values]
        draws.append(needed([resample(v) for _, v in uniform], [resample(v) for _, v in other]))
    rows = []
    for j, (u_params, u_values) in enumerate(uniform):
        lo, hi = percentile_interval([d[j] / u_params for d in draws], level)
        rows.append({"uniform_params": u_params, "target": statistics.mean(u_values), "params": point[j],
                     "ratio": point[j] / u_params, "ratio_low": lo, "ratio_high": hi})
    return rows


def mean_interval(values: list[float], resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the mean over seeds (the shaded band of the savings plot)."""
    rng = random.Random(seed)
    return percentile_interval([statistics.mean(rng.choice(values) for _ in values) for _ in range(resamples)], level)


def percentile_interval(draws: list[float], level: float) -> tuple[float, float]:
    """The central `level` interval of bootstrap draws, by order statistics (draws may be 0 or inf: below the sweep,
    not reached)."""
    draws = sorted(draws)
    n = len(draws) - 1
    return draws[math.floor((1 - level) / 2 * n)], draws[math.ceil((1 + level) / 2 * n)]
