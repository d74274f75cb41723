"""Hessian online (paper 000 Sec. 2.6): ranks grow during training. This module holds the pure decisions (the
start, and each event's growth); the growth method (lorambo/methods/growth.py) measures the benefits and grows
the real tensors.

- Start: every layer at `start_rank`, or (`start: offline`) the Hessian square-root law on `offline_fraction`
  of the budget with at least `start_rank` each (METHODS.md: "offline curvature-aware initialization + online
  adaptation").
- Growth: given each layer's marginal benefits of further ranks, Delta_ij ~ sigma_j(R_i)^2 / (2 h_i) (R_i the
  layer's full-weight gradient with the current adapter subspace projected out, h_i its mean curvature
  diagonal), add ranks greedily by rho = Delta / c_i within this event's share of the budget, never a
  non-positive one.
- Curvature: h_i = T_i / (d_out d_in) from the layer's curvature trace T_i (`method.curvature: fisher_trace`, the
  Gauss-Newton trace, always >= 0; or `hessian_trace`, the paper's Hutchinson Tr(H_i)). A layer whose trace is
  not usable (<= 0 or not finite) gets the largest usable h: the smallest benefit, so it is the least
  attractive layer to grow, as its floored sensitivity makes it the least important offline. A floored value
  never enters the division.
- Events: `growth_events` events spread evenly over the first half of the run (`event_steps`), or every
  `grow_every` steps when that is set.
"""

import math

import numpy as np

from lorambo.allocators import register
from lorambo.allocators.greedy import greedy_fill, square_root_allocation
from lorambo.budget import LayerSpec, allocation_cost
from lorambo.errors import LoramboError


def _needs(start: str = "small", sensitivity: str = "fisher_trace", **_) -> set[str]:
    return {sensitivity} if start == "offline" else set()


@register("hessian_online", required_stats=_needs)
def initial_ranks(layers, p_max, stats, start: str = "small", start_rank: int = 1, offline_fraction: float = 0.5,
                  sensitivity: str = "fisher_trace", **_) -> dict[str, int]:
    floor = {l.name: min(start_rank, l.max_rank) for l in layers}
    if allocation_cost(floor, layers) > p_max:
        raise LoramboError(f"budget P_max={p_max:,} cannot start every layer at rank {start_rank}; "
                           f"use a larger budget or allocator.start_rank=1")
    if start == "small":
        return floor
    part = max(int(offline_fraction * p_max), allocation_cost(floor, layers))
    ranks = square_root_allocation(layers, part, stats[sensitivity])
    ranks = {name: max(r, floor[name]) for name, r in ranks.items()}
    while allocation_cost(ranks, layers) > p_max:  # raising to the floor may overshoot: trim
        top = max(layers, key=lambda l: (ranks[l.name] - floor[l.name], l.cost))
        ranks[top.name] -= 1
    return ranks


def mean_curvatures(layers: list[LayerSpec], traces: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """h_i = T_i / (d_out d_in) from raw (unfloored) traces; layers with no usable trace (<= 0, not finite) get
    the largest usable h. Returns (h, the layers that had no usable trace)."""
    usable = {l.name: traces[l.name] / (l.d_out * l.d_in) for l in layers
              if math.isfinite(traces[l.name]) and traces[l.name] > 0}
    if not usable:
        raise LoramboError("no layer has a positive curvature estimate, so growth benefits are undefined; use "
                           "method.curvature=fisher_trace (never negative) or more sensitivity batches")
    unusable = [l.name for l in layers if l.name not in usable]
    top = max(usable.values())
    return {l.name: usable.get(l.name, top) for l in layers}, unusable


def marginal_benefits(residual_singular_values: np.ndarray, curvature: float) -> np.ndarray:
    """Loss decrease of each further rank along the residual's singular pairs: sigma_j^2 / (2 h), h > 0."""
    assert curvature > 0, "curvature must be a usable (positive) estimate"
    return np.asarray(residual_singular_values, dtype=np.float64) ** 2 / (2.0 * curvature)


def event_steps(total_steps: int, events: int, grow_every: int | None) -> list[int]:
    """The steps at which growth events happen: every `grow_every` steps when set (events past the run's end
    do not happen), else `events` steps spread evenly over the first half of the run (at least one step
    apart, so a short run may hold fewer)."""
    if grow_every:
        return [k * grow_every for k in range(1, events + 1)]
    half = max(1, total_steps // 2)
    return sorted({max(1, round(k * half / events)) for k in range(1, events + 1)})


def growth_decision(layers: list[LayerSpec], ranks: dict[str, int], budget: int,
                    benefits: dict[str, np.ndarray]) -> dict[str, int]:
    """How many ranks each layer gains in this event, spending at most `budget` parameters."""
    start = dict(ranks)

    def gain(layer: LayerSpec, r: int) -> float:
        j = r - start[layer.name]
        values = benefits.get(layer.name, ())
        return float(values[j]) if j < len(values) else 0.0

    spent = allocation_cost(ranks, layers)
    grown = greedy_fill(layers, spent + budget, gain, start=start, only_positive=True)
    return {name: grown[name] - start[name] for name in start if grown[name] > start[name]}
