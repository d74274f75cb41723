"""The allocation rules, without a model: budget, optimality against brute force, the Lagrange conditions."""

import itertools
import math
import random

import numpy as np
import pytest

from lorambo.allocators import allocate, required_stats
from lorambo.allocators.greedy import square_root_ranks
from lorambo.allocators.hessian_online import growth_decision
from lorambo.budget import LayerSpec, allocation_cost

OFFLINE = [
    ("uniform", {}),
    ("frobenius_greedy", {}),
    ("frobenius_greedy", {"target": "update"}),
    ("gradient", {}),
    ("hessian_offline", {}),
    ("hessian_offline", {"sensitivity": "hessian_opnorm"}),
    ("hessian_offline", {"variant": "knapsack"}),
    ("data_weighted", {}),
    ("gora", {"max_rank_factor": 1000}),  # no cap below full rank: then the whole budget can be spent
]


def random_instance(rng, n_layers, max_dim=64):
    layers = [LayerSpec(f"l{i}", rng.randint(1, max_dim), rng.randint(1, max_dim)) for i in range(n_layers)]
    spectrum = lambda l: np.sort(np.abs(np.array([rng.gauss(0, 1) for _ in range(l.max_rank)])))[::-1]
    positive = lambda: {l.name: rng.lognormvariate(0, 1.5) for l in layers}
    stats = {"weight_spectra": {l.name: spectrum(l) for l in layers},
             "update_spectra": {l.name: spectrum(l) for l in layers},
             "weighted_spectra": {l.name: spectrum(l) for l in layers},
             "gradient": positive(), "hessian_trace": positive(), "hessian_opnorm": positive(),
             "fisher_trace": positive(), "gradient_saliency": positive(),
             "mean_gradient": {}}  # read only by GoRA's start
    stats["explained_variance"] = {name: v ** 2 / (v ** 2).sum() for name, v in stats["weight_spectra"].items()}
    return layers, stats


@pytest.mark.parametrize("name,options", OFFLINE)
@pytest.mark.parametrize("seed", range(15))
def test_budget_holds_and_is_spent(name, options, seed):
    rng = random.Random(seed)
    layers, stats = random_instance(rng, rng.randint(1, 25))
    p_max = rng.randint(sum(l.cost for l in layers), sum(l.cost * l.max_rank for l in layers))
    assert required_stats(name, **options) <= set(stats)
    ranks = allocate(name, layers, p_max, stats, **options)
    cost = allocation_cost(ranks, layers)
    assert cost <= p_max
    assert all(ranks.get(l.name, 0) >= 1 for l in layers), "a layer left out although rank 1 everywhere fits"
    all_full = all(ranks.get(l.name, 0) == l.max_rank for l in layers)
    if name == "uniform":  # uniform may leave up to one round of sum c_i: it gives everyone the same rank
        assert p_max - cost < sum(l.cost for l in layers) or all_full
    else:
        assert p_max - cost < max(l.cost for l in layers) or all_full


def brute_force(layers, p_max, objective, low=0):
    best, best_value = None, math.inf
    for combo in itertools.product(*[range(low, l.max_rank + 1) for l in layers]):
        if sum(r * l.cost for r, l in zip(combo, layers)) <= p_max:
            value = objective(dict(zip([l.name for l in layers], combo)))
            if value < best_value:
                best, best_value = combo, value
    return best_value


def tail_energy(spectra, weights=None):
    return lambda ranks: sum((1.0 if weights is None else weights[n]) * float(np.sum(spectra[n][ranks[n]:] ** 2))
                             for n in ranks)


def inverse_rank(s):
    return lambda ranks: sum(s[n] / r if r > 0 else math.inf for n, r in ranks.items())


GREEDY_CASES = [  # (allocator, options, objective from stats)
    ("frobenius_greedy", {}, lambda st: tail_energy(st["weight_spectra"])),
    ("data_weighted", {}, lambda st: tail_energy(st["weighted_spectra"])),
    ("hessian_offline", {"variant": "knapsack"}, lambda st: tail_energy(st["weight_spectra"], st["hessian_trace"])),
    ("gradient", {}, lambda st: inverse_rank(st["gradient"])),
    ("hessian_offline", {}, lambda st: inverse_rank(st["hessian_trace"])),
]


@pytest.mark.parametrize("name,options,objective", GREEDY_CASES)
@pytest.mark.parametrize("seed", range(12))
def test_equal_costs_match_brute_force_exactly(name, options, objective, seed):
    """With equal costs every rank is the same item size, and greedy on a concave separable objective is exact."""
    rng = random.Random(100 + seed)
    d = rng.randint(3, 5)
    layers = [LayerSpec(f"l{i}", d, d + 1) for i in range(3)]
    stats = random_instance_for(rng, layers)
    p_max = rng.randint(3, 3 * d) * layers[0].cost
    ranks = allocate(name, layers, p_max, stats, **options)
    full = {l.name: ranks.get(l.name, 0) for l in layers}
    # p_max >= sum c_i: the problem is over r_i >= 1 (no layer left out)
    assert objective(stats)(full) == pytest.approx(brute_force(layers, p_max, objective(stats), low=1), rel=1e-12)


@pytest.mark.parametrize("name,options,objective", GREEDY_CASES)
@pytest.mark.parametrize("seed", range(12))
def test_unequal_costs_are_optimal_up_to_the_last_item(name, options, objective, seed):
    """With unequal costs greedy may miss the exact optimum, but never does worse than the best allocation of
    P_max - max_i c_i (what 'optimal up to the last item' means), and never better than the optimum at P_max."""
    rng = random.Random(200 + seed)
    layers = [LayerSpec(f"l{i}", rng.randint(2, 5), rng.randint(2, 9)) for i in range(3)]
    stats = random_instance_for(rng, layers)
    p_max = rng.randint(sum(l.cost for l in layers), sum(l.cost * l.max_rank for l in layers))
    ranks = allocate(name, layers, p_max, stats, **options)
    value = objective(stats)({l.name: ranks.get(l.name, 0) for l in layers})
    assert value >= brute_force(layers, p_max, objective(stats), low=1) - 1e-9
    assert value <= brute_force(layers, p_max - max(l.cost for l in layers), objective(stats), low=1) + 1e-9


def random_instance_for(rng, layers):
    spectrum = lambda l: np.sort(np.abs(np.array([rng.gauss(0, 1) for _ in range(l.max_rank)])))[::-1]
    return {"weight_spectra": {l.name: spectrum(l) for l in layers},
            "weighted_spectra": {l.name: spectrum(l) for l in layers},
            "gradient": {l.name: rng.lognormvariate(0, 1) for l in layers},
            "hessian_trace": {l.name: rng.lognormvariate(0, 1) for l in layers}}


def test_square_root_solution_satisfies_the_lagrange_conditions():
    rng = random.Random(7)
    layers = [LayerSpec(f"l{i}", rng.randint(10, 500), rng.randint(10, 500)) for i in range(12)]
    s = {l.name: rng.lognormvariate(0, 2) for l in layers}
    p_max = 123_456.0
    r = square_root_ranks(layers, p_max, s)
    # d/dr_i [sum s/r + lambda (sum r c - P)] = 0  =>  s_i / (r_i^2 c_i) = lambda, the same for every layer
    multipliers = [s[l.name] / (r[l.name] ** 2 * l.cost) for l in layers]
    assert max(multipliers) == pytest.approx(min(multipliers), rel=1e-9)
    assert sum(r[l.name] * l.cost for l in layers) == pytest.approx(p_max, rel=1e-12)


def test_ranks_rise_with_sensitivity_and_fall_with_cost():
    same_cost = [LayerSpec(f"s{i}", 300, 300) for i in range(5)]
    s = {l.name: float(i + 1) for i, l in enumerate(same_cost)}
    continuous = square_root_ranks(same_cost, 20_000, s)
    integer = allocate("hessian_offline", same_cost, 20_000, {"hessian_trace": s})
    names = [l.name for l in same_cost]
    assert all(continuous[a] < continuous[b] for a, b in zip(names, names[1:]))
    assert all(integer[a] <= integer[b] for a, b in zip(names, names[1:])) and integer[names[0]] < integer[names[-1]]

    costly = [LayerSpec(f"c{i}", 100 * (i + 1), 100 * (i + 1)) for i in range(5)]
    s = {l.name: 1.0 for l in costly}
    continuous = square_root_ranks(costly, 20_000, s)
    integer = allocate("gradient", costly, 20_000, {"gradient": s})
    names = [l.name for l in costly]
    assert all(continuous[a] > continuous[b] for a, b in zip(names, names[1:]))
    assert all(integer[a] >= integer[b] for a, b in zip(names, names[1:])) and integer[names[0]] > integer[names[-1]]


@pytest.mark.parametrize("seed", range(20))
def test_online_growth_never_passes_its_budget_and_takes_only_positive_benefit(seed):
    rng = random.Random(seed)
    layers, _ = random_instance(rng, rng.randint(1, 15))
    ranks = {l.name: rng.randint(1, l.max_rank) for l in layers}
    budget = rng.randint(0, 5 * max(l.cost for l in layers))
    benefits = {l.name: np.sort(np.array([rng.uniform(-1, 1) for _ in range(l.max_rank - ranks[l.name])]))[::-1]
                for l in layers}
    increments = growth_decision(layers, ranks, budget, benefits)
    by_name = {l.name: l for l in layers}
    assert sum(k * by_name[n].cost for n, k in increments.items()) <= budget
    for name, k in increments.items():
        assert ranks[name] + k <= by_name[name].max_rank
        assert np.all(benefits[name][:k] > 0)


def test_online_start_offline_fits_and_respects_the_floor():
    rng = random.Random(3)
    layers, stats = random_instance(rng, 10)
    p_max = 4 * sum(l.cost for l in layers)
    ranks = allocate("hessian_online", layers, p_max, stats, start="offline", offline_fraction=0.5, start_rank=1)
    assert all(ranks[l.name] >= 1 for l in layers)
    assert allocation_cost(ranks, layers) <= p_max
    small = allocate("hessian_online", layers, p_max, stats, start="small", start_rank=2)
    assert all(small[l.name] == min(2, l.max_rank) for l in layers)


def test_allocation_of_1000_layers_is_fast():
    import time

    rng = random.Random(0)
    layers, stats = random_instance(rng, 1000, max_dim=256)
    p_max = 8 * sum(l.cost for l in layers)
    for name, options in OFFLINE:
        start = time.perf_counter()
        allocate(name, layers, p_max, stats, **options)
        assert time.perf_counter() - start < 5.0, name  # generous: a correctness bound, not a benchmark


def test_every_allocation_function_takes_keyword_options_it_does_not_read():
    """The pure functions take the options as keywords and read their own (a config key no allocator reads is
    refused earlier, by allocation.allocator_options: test_an_unknown_allocator_option_is_one_line)."""
    from lorambo.allocators import ALLOCATORS

    layers, stats = random_instance(random.Random(5), 6)
    for name in ALLOCATORS:
        ranks = allocate(name, layers, 3 * sum(l.cost for l in layers), stats, grow_every=25, unrelated="x")
        assert ranks


def minilm_like_layers():
    """The 36 adapted projections of MiniLM-L6 (hidden 384, intermediate 1536)."""
    shapes = {"query": (384, 384), "key": (384, 384), "value": (384, 384), "attention.output.dense": (384, 384),
              "intermediate.dense": (1536, 384), "output.dense": (384, 1536)}
    return [LayerSpec(f"encoder.layer.{b}.{k}", *shape) for b in range(6) for k, shape in shapes.items()]


@pytest.mark.parametrize("name", ["gradient", "hessian_offline"])
def test_square_root_law_leaves_no_layer_out_when_sensitivities_are_tiny(name):
    """Regression: the law rounded the continuous ranks down and topped up greedily; with a few floored (tiny)
    sensitivities the rounded start spent the budget before those layers got a first rank (5 of 36 on the
    offline default at r4), although rank 1 everywhere costs a quarter of the budget."""
    layers = minilm_like_layers()
    rng = random.Random(0)
    s = {l.name: rng.lognormvariate(0, 1.0) for l in layers}
    for l in layers[-8:]:  # deep layers whose estimate was floored at 1e-6 of the largest
        s[l.name] = 1e-6 * max(s.values())
    stat = "gradient" if name == "gradient" else "hessian_trace"
    p_max = 4 * sum(l.cost for l in layers)
    ranks = allocate(name, layers, p_max, {stat: s})
    assert all(ranks.get(l.name, 0) >= 1 for l in layers)
    assert p_max - allocation_cost(ranks, layers) < max(l.cost for l in layers)


@pytest.mark.parametrize("seed", range(30))
def test_square_root_law_against_brute_force_with_tiny_sensitivities(seed):
    """Random small instances, sensitivities over many orders of magnitude: no layer is dropped where a finite
    optimum exists (P_max >= sum c_i), and the value is within the README's bound (never worse than the best
    allocation of P_max - max_i c_i)."""
    rng = random.Random(300 + seed)
    layers = [LayerSpec(f"l{i}", rng.randint(2, 6), rng.randint(2, 8)) for i in range(rng.randint(2, 4))]
    s = {l.name: 10 ** rng.uniform(-7, 1) for l in layers}
    p_max = rng.randint(sum(l.cost for l in layers), sum(l.cost * l.max_rank for l in layers))
    ranks = allocate("hessian_offline", layers, p_max, {"hessian_trace": s})
    assert all(ranks.get(l.name, 0) >= 1 for l in layers)
    value = inverse_rank(s)({l.name: ranks.get(l.name, 0) for l in layers})
    assert value >= brute_force(layers, p_max, inverse_rank(s)) * (1 - 1e-12)
    assert value <= brute_force(layers, p_max - max(l.cost for l in layers), inverse_rank(s)) * (1 + 1e-12)


def test_a_budget_below_rank_one_everywhere_adapts_the_most_sensitive_per_parameter_and_says_so():
    from lorambo.allocators.greedy import left_out

    layers = [LayerSpec("a", 10, 10), LayerSpec("b", 10, 10), LayerSpec("c", 10, 10)]
    s = {"a": 1.0, "b": 5.0, "c": 3.0}
    ranks = allocate("hessian_offline", layers, 45, {"hessian_trace": s})
    assert ranks == {"b": 1, "c": 1}
    note = left_out(layers, 45, ranks)
    assert note["left_out"] == ["a"] and "below rank 1 on every layer" in note["left_out_reason"]
    assert left_out(layers, 60, allocate("hessian_offline", layers, 60, {"hessian_trace": s})) == {}
