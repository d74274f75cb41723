import random

import pytest

from lorambo.allocators import allocate
from lorambo.budget import LayerSpec, allocation_cost, check_budget, resolve_p_max
from lorambo.errors import LoramboError
from omegaconf import OmegaConf


def random_layers(rng, n):
    return [LayerSpec(f"l{i}", rng.randint(1, 300), rng.randint(1, 300), "linear") for i in range(n)]


def test_conv2d_cost_is_peft_layout():
    # PEFT's conv LoRA: A is a full-kernel conv (c_in*kh*kw per rank), B is 1x1 (c_out per rank)
    conv = LayerSpec("c", d_out=64, d_in=32 * 3 * 3, kind="conv2d")
    assert conv.cost == 32 * 9 + 64
    assert conv.max_rank == 64


def test_match_uniform_budget_is_rank_times_costs():
    layers = [LayerSpec("a", 10, 20), LayerSpec("b", 30, 5)]
    budget = OmegaConf.create({"kind": "match_uniform", "rank": 4, "scale": 1.0})
    assert resolve_p_max(budget, layers) == 4 * (30 + 35)


@pytest.mark.parametrize("seed", range(20))
def test_uniform_respects_budget_and_leaves_less_than_one_round(seed):
    rng = random.Random(seed)
    layers = random_layers(rng, rng.randint(1, 30))
    p_max = rng.randint(sum(l.cost for l in layers), sum(l.cost * l.max_rank for l in layers))
    ranks = allocate("uniform", layers, p_max)
    assert allocation_cost(ranks, layers) <= p_max
    # brute force: every common rank that fits, clipped per layer; uniform takes the largest
    fitting = [r for r in range(1, max(l.max_rank for l in layers) + 1)
               if sum(min(r, l.max_rank) * l.cost for l in layers) <= p_max]
    assert all(ranks[l.name] == min(max(fitting), l.max_rank) for l in layers)
    if max(fitting) == p_max // sum(l.cost for l in layers):  # no layer saturated: the plain formula
        assert all(ranks[l.name] == min(p_max // sum(l.cost for l in layers), l.max_rank) for l in layers)


def test_budget_smaller_than_one_rank_is_a_user_error():
    layers = [LayerSpec("a", 10, 20), LayerSpec("b", 30, 5)]
    with pytest.raises(LoramboError, match="smaller than one rank"):
        check_budget(29, layers)


def test_budget_above_full_rank_is_a_user_error():
    layers = [LayerSpec("a", 10, 20)]
    with pytest.raises(LoramboError, match="exceeds full rank"):
        check_budget(10 * 30 + 1, layers)


def test_uniform_below_rank_one_is_a_user_error():
    layers = [LayerSpec("a", 10, 20), LayerSpec("b", 30, 5)]
    with pytest.raises(LoramboError, match="below uniform rank 1"):
        allocate("uniform", layers, 40)


def test_unknown_allocator_is_a_user_error():
    with pytest.raises(LoramboError, match="unknown allocator"):
        allocate("nope", [LayerSpec("a", 2, 2)], 4)

