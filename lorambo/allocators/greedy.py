"""The two allocation rules every sensitivity-based allocator is built from.

- `greedy_fill`: every layer first gets rank 1 when the budget allows it (sum_i c_i <= P_max; otherwise first
  ranks go by gain per parameter until none fits, and the layers left out are named by `left_out`); then one
  rank at a time to the layer with the largest marginal gain per parameter among those that still fit. With
  gains non-increasing in r (a concave objective) this is optimal up to the last item for the problem with
  r_i >= 1: it never does worse than the best such allocation of P_max - max_i c_i.
- `square_root_allocation`: the objective sum_i s_i / r_i by that greedy. Its continuous minimiser under
  sum_i r_i c_i = P_max is r_i = P_max sqrt(s_i / c_i) / sum_j sqrt(s_j c_j) (`square_root_ranks`: the
  budget-exact form of paper 000's Theorem 1; the printed form sums ranks, not parameters: METHODS.md
  section 2). The integer ranks are not that solution rounded down: with tiny sensitivities the rounded start
  spent the budget before some layers got their first rank (they ended unadapted, an infinite objective).
"""

import heapq
import math
from typing import Callable

import numpy as np

from lorambo.budget import LayerSpec, allocation_cost

MarginalGain = Callable[[LayerSpec, int], float]  # gain of raising a layer's rank from r to r + 1


def first_ranks(layers: list[LayerSpec], p_max: int, priority: Callable[[LayerSpec], float]) -> dict[str, int]:
    """Rank 1 for every layer when the budget allows it; otherwise rank 1 by largest priority per parameter
    while any fits (the rest stay at 0: the budget cannot adapt every layer)."""
    if sum(layer.cost for layer in layers) <= p_max:
        return {layer.name: 1 for layer in layers}
    ranks, spent = {layer.name: 0 for layer in layers}, 0
    for layer in sorted(layers, key=lambda l: -priority(l) / l.cost):  # stable: ties keep layer order
        if spent + layer.cost <= p_max:
            ranks[layer.name], spent = 1, spent + layer.cost
    return ranks


def left_out(layers: list[LayerSpec], p_max: int, ranks: dict[str, int]) -> dict:
    """What allocation.json says of layers an allocation leaves unadapted: which, and why."""
    names = [l.name for l in layers if ranks.get(l.name, 0) == 0]
    if not names:
        return {}
    total = sum(l.cost for l in layers)
    why = (f"P_max={p_max:,} is below rank 1 on every layer ({total:,} params): first ranks went by the "
           f"allocator's statistic per parameter" if p_max < total else "the allocator gave these layers no rank")
    return {"left_out": names, "left_out_reason": why}


def greedy_fill(layers: list[LayerSpec], p_max: int, gain: MarginalGain,
                start: dict[str, int] | None = None, only_positive: bool = False,
                priority: Callable[[LayerSpec], float] | None = None) -> dict[str, int]:
    """From `start`, add ranks by largest gain per parameter while any fits; with `only_positive`, a rank whose
    gain is not positive is never added (online growth's stopping rule). Without `start`, every layer gets
    rank 1 first (`first_ranks`, ordered by `priority`, default the first rank's gain) so that no layer is left
    out while the budget can adapt them all."""
    if start is None:
        start = first_ranks(layers, p_max, priority or (lambda layer: gain(layer, 0)))
    ranks = {layer.name: start.get(layer.name, 0) for layer in layers}
    spent = allocation_cost(ranks, layers)

    def push(heap, i):
        layer = layers[i]
        if ranks[layer.name] < layer.max_rank:
            g = gain(layer, ranks[layer.name])
            if g > 0 or not only_positive:
                heapq.heappush(heap, (-g / layer.cost, i))  # ties go to the earlier layer: deterministic

    heap = []
    for i in range(len(layers)):
        push(heap, i)
    while heap:
        _, i = heapq.heappop(heap)
        layer = layers[i]
        if spent + layer.cost > p_max:
            continue  # spending only grows: this layer never fits again
        ranks[layer.name] += 1
        spent += layer.cost
        push(heap, i)
    return ranks


def spectrum_gain(spectra: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> MarginalGain:
    """Marginal gain s_i * sigma_{r+1}^2: what the (r+1)-th singular pair removes from s_i ||T_i - X||_F^2."""

    def gain(layer: LayerSpec, r: int) -> float:
        sigma = spectra[layer.name]
        s = 1.0 if weights is None else weights[layer.name]
        return s * float(sigma[r]) ** 2 if r < len(sigma) else 0.0

    return gain


def inverse_rank_gain(sensitivities: dict[str, float]) -> MarginalGain:
    """Marginal gain of the objective sum s_i / r_i: s_i/r - s_i/(r+1); the first rank is worth everything."""

    def gain(layer: LayerSpec, r: int) -> float:
        s = sensitivities[layer.name]
        return math.inf if r == 0 else s / (r * (r + 1))

    return gain


def square_root_ranks(layers: list[LayerSpec], p_max: float, sensitivities: dict[str, float]) -> dict[str, float]:
    norm = sum(math.sqrt(sensitivities[l.name] * l.cost) for l in layers)
    return {l.name: p_max * math.sqrt(sensitivities[l.name] / l.cost) / norm for l in layers}


def square_root_allocation(layers: list[LayerSpec], p_max: int, sensitivities: dict[str, float]) -> dict[str, int]:
    """Integer ranks of the square-root law: minimise sum_i s_i / r_i under the budget by greedy from rank 1
    everywhere (exact for equal costs, within the last item otherwise; its ranks track the continuous
    solution to within a rank or so). When rank 1 everywhere does not fit, first ranks go by s_i / c_i."""
    return greedy_fill(layers, p_max, inverse_rank_gain(sensitivities), priority=lambda l: sensitivities[l.name])
