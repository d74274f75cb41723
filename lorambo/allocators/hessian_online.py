"""Hessian online (paper 000 Sec. 2.6): ranks grow during training. This module holds the two pure decisions;
lorambo/growth.py measures the benefits and grows the real tensors.

- Start: every layer at `start_rank`, or (`start: offline`) the Hessian square-root law on `offline_fraction`
  of the budget with at least `start_rank` each (METHODS.md: "offline curvature-aware initialization + online
  adaptation").
- Growth: given each layer's marginal benefits of further ranks, Delta_ij ~ sigma_j(R_i)^2 / (2 h_i) (R_i the
  layer's full-weight gradient with the current adapter subspace projected out, h_i its mean Hessian diagonal),
  add ranks greedily by rho = Delta / c_i within this event's share of the budget, never a non-positive one.
"""

import numpy as np

from lorambo.allocators import register
from lorambo.allocators.greedy import greedy_fill, square_root_allocation
from lorambo.budget import LayerSpec
from lorambo.errors import LoramboError


@register("hessian_online", required_stats=lambda **_: {"hessian_trace"})
def initial_ranks(layers, p_max, stats, start: str = "small", start_rank: int = 1, offline_fraction: float = 0.5,
                  **_) -> dict[str, int]:
    floor = {l.name: min(start_rank, l.max_rank) for l in layers}
    if sum(floor[l.name] * l.cost for l in layers) > p_max:
        raise LoramboError(f"budget P_max={p_max:,} cannot start every layer at rank {start_rank}; "
                           f"use a larger budget or allocator.start_rank=1")
    if start == "small":
        return floor
    part = max(int(offline_fraction * p_max), sum(floor[l.name] * l.cost for l in layers))
    ranks = square_root_allocation(layers, part, stats["hessian_trace"])
    ranks = {name: max(r, floor[name]) for name, r in ranks.items()}
    while sum(ranks[l.name] * l.cost for l in layers) > p_max:  # raising to the floor may overshoot: trim
        top = max(layers, key=lambda l: (ranks[l.name] - floor[l.name], l.cost))
        ranks[top.name] -= 1
    return ranks


def marginal_benefits(residual_singular_values: np.ndarray, curvature: float) -> np.ndarray:
    """Loss decrease of each further rank along the residual's singular pairs: sigma_j^2 / (2 h)."""
    return np.asarray(residual_singular_values, dtype=np.float64) ** 2 / (2.0 * max(curvature, 1e-30))


def growth_decision(layers: list[LayerSpec], ranks: dict[str, int], budget: int,
                    benefits: dict[str, np.ndarray]) -> dict[str, int]:
    """How many ranks each layer gains in this event, spending at most `budget` parameters."""
    start = dict(ranks)

    def gain(layer: LayerSpec, r: int) -> float:
        j = r - start[layer.name]
        values = benefits.get(layer.name, ())
        return float(values[j]) if j < len(values) else 0.0

    spent = sum(ranks[l.name] * l.cost for l in layers)
    grown = greedy_fill(layers, spent + budget, gain, start=start, only_positive=True)
    return {name: grown[name] - start[name] for name in start if grown[name] > start[name]}
