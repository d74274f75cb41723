"""Every allocator on every model family, without training: every statistic measured on the family's real layers
(DeBERTa runs query_proj and key_proj on its position embeddings too; ResNet's are convolutions), every allocator
spends the budget on what was found, and PEFT wraps each allocation exactly: each layer holds its rank, the
adapter holds the counted parameters, and each layer's scale is its policy's (`lora.scaling`)."""

import copy

import pytest
import torch

from lorambo.adapters import effective_scalings, wrap_lora
from lorambo.allocation import measure
from lorambo.allocators import ALLOCATORS, allocate, import_allocators, required_stats
from lorambo.allocators.uniform import uniform_rank
from lorambo.budget import resolve_p_max
from lorambo.models import adaptable_layers, load_data_and_base, resolve_family
from tests.helpers import FAMILIES, SMALL_DATA, STATS_FEW, compose_cfg, family_overrides


def policy_scale(scaling, alpha, r, r_u):
    return {"matched": alpha / r_u, "per_layer": alpha / r, "rslora": alpha / r ** 0.5}[scaling]


def measured(family, pair_csv):
    """(cfg, base model, its layers, p_max at r4, every statistic any allocator reads) of a family."""
    cfg = compose_cfg([*family_overrides(family, pair_csv), *SMALL_DATA, *STATS_FEW, "budget=r4"])
    resolve_family(cfg)
    torch.manual_seed(0)
    data, model = load_data_and_base(cfg, "/nonexistent-unused", False)
    layers = adaptable_layers(model, cfg.model.target_modules)
    p_max = resolve_p_max(cfg.budget, layers)
    import_allocators()
    vision = cfg.model.family == "vision"
    names = sorted(n for n in ALLOCATORS if not (vision and n == "eva"))  # PEFT's EVA adapts no convolution
    needed = set().union(*(required_stats(name) for name in names))
    return cfg, model, layers, p_max, names, measure(needed, cfg, model, layers, data, torch.device("cpu"), 1, p_max)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_allocator_spends_the_budget_on_every_family_and_peft_holds_it(family, pair_csv):
    cfg, model, layers, p_max, names, stats = measured(family, pair_csv)
    costliest = max(l.cost for l in layers)
    cost = {l.name: l.cost for l in layers}
    r_u = uniform_rank(layers, p_max)
    assert r_u == 4
    spread = 0
    for name in names:
        ranks = allocate(name, layers, p_max, stats)
        spent = sum(r * cost[n] for n, r in ranks.items())
        assert 0 < spent <= p_max, name
        if name != "hessian_online":  # it starts below the budget and grows into the rest while training
            assert p_max - costliest < spent, name
        spread += len(set(ranks.values())) > 1
        for scaling in ("matched", "per_layer", "rslora"):
            lora = copy.deepcopy(cfg.lora)
            lora.scaling = scaling
            wrapped = wrap_lora(copy.deepcopy(model), ranks, cfg.model.head_modules, lora, False, r_u)
            held = {n: p.numel() for n, p in wrapped.named_parameters() if "lora_" in n}
            assert sum(held.values()) == spent, (name, scaling)
            got = effective_scalings(wrapped)
            assert set(got) == set(ranks), (name, scaling)
            for layer, scale in got.items():
                assert scale == pytest.approx(policy_scale(scaling, lora.alpha, ranks[layer], r_u), rel=1e-12), (
                    name, scaling, layer)
    assert spread >= 2  # the check saw allocations where the policies differ
