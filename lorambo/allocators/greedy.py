"""The two allocation rules every sensitivity-based allocator is built from.

- `greedy_fill`: give one rank at a time to the layer with the largest marginal gain per parameter among those
  that still fit. With gains non-increasing in r (a concave objective) this is optimal for the separable
  problem up to the last item: it never does worse than the best allocation of P_max - max_i c_i.
- `square_root_ranks`: the continuous minimiser of sum_i s_i / r_i subject to sum_i r_i c_i = P_max,
  r_i = P_max sqrt(s_i / c_i) / sum_j sqrt(s_j c_j) (the budget-exact form of paper 000's Theorem 1; the
  printed form sums ranks, not parameters: METHODS.md section 2).
"""

import heapq
import math
from typing import Callable

import numpy as np

from lorambo.budget import LayerSpec

MarginalGain = Callable[[LayerSpec, int], float]  # gain of raising a layer's rank from r to r + 1


def greedy_fill(layers: list[LayerSpec], p_max: int, gain: MarginalGain,
                start: dict[str, int] | None = None, only_positive: bool = False) -> dict[str, int]:
    """From `start` (default all zero), add ranks by largest gain per parameter while any fits; with
    `only_positive`, a rank whose gain is not positive is never added (online growth's stopping rule)."""
    ranks = {layer.name: (start or {}).get(layer.name, 0) for layer in layers}
    spent = sum(ranks[layer.name] * layer.cost for layer in layers)

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
    """Budget-exact square-root law: round the continuous solution down, clip to each layer's bounds, then
    spend what is left greedily by marginal gain per parameter of the same objective."""
    continuous = square_root_ranks(layers, p_max, sensitivities)
    start = {l.name: min(int(math.floor(continuous[l.name])), l.max_rank) for l in layers}
    return greedy_fill(layers, p_max, inverse_rank_gain(sensitivities), start=start)
