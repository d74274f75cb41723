"""GoRA, gradient-driven adaptive low-rank adaptation (He et al., NeurIPS 2025, arXiv 2502.12171).

Before training, the gradient of every adapted weight is averaged over the estimation batches (G_i). A
layer's importance is mean_jk |W_i ⊙ G_i| (the paper's default); the budget is shared in proportion to it,
counted in parameters: layer i's share P_max I_i / sum I, divided by its cost c_i = d_in + d_out, is its
target rank, kept within [min_rank, max_rank_factor x uniform rank]. GoRA rounds the targets (and may then
miss the budget either way); here every layer starts at min_rank and P_max is spent one rank at a time on the
layer furthest below its target, so that every row spends the same budget. B then starts as a compressed
gradient step (`gradient_step_B`)."""

import heapq
import math

import torch

from lorambo.adapters import ADAPTER, factor_matrices, lora_layers
from lorambo.allocators import register
from lorambo.allocators.uniform import uniform_rank
from lorambo.budget import allocation_cost
from lorambo.errors import LoramboError


def gradient_step_B(A: torch.Tensor, G: torch.Tensor, scale: float, step: float) -> torch.Tensor:
    """B with scale * B A = -xi G A^T (A A^T)^+ A: one gradient-descent step of size xi on G projected onto A's
    row space (GoRA's pseudo-inverse start, A random and kept). xi = step * sqrt(d_in / r) gives the projected
    gradient back the norm a random rank-r projection takes away (the official code's scale_by_lr). float64."""
    A64, G64 = A.double(), G.double()
    r, d_in = A64.shape
    xi = step * math.sqrt(d_in / r)
    B = G64 @ A64.T @ torch.linalg.pinv(A64 @ A64.T)
    return (-(xi / scale) * B).to(A.dtype)


def start_from_gradient(peft_model, stats: dict, init_step: float = 1e-3) -> None:
    for name, layer in lora_layers(peft_model).items():
        A, _ = factor_matrices(layer)
        weight = layer.lora_B[ADAPTER].weight
        B = gradient_step_B(A.detach(), stats["mean_gradient"][name].to(A.device), float(layer.scaling[ADAPTER]),
                            init_step)
        weight.data.copy_(B.reshape(weight.shape))


def gora_in_peft(config, task_type: str) -> str:
    return ("GoRA's ranks only: PEFT has no start from a gradient step, so this config starts as PEFT's default "
            "(A random, B zero); lorambo-run starts B from the measured gradient")


@register("gora", required_stats=lambda **_: {"gradient_saliency", "mean_gradient"}, initialise=start_from_gradient,
          peft_start=gora_in_peft)
def gora_ranks(layers, p_max, stats, min_rank: int = 1, max_rank_factor: float = 4.0, **_) -> dict[str, int]:
    importance = stats["gradient_saliency"]
    total = sum(importance[layer.name] for layer in layers)
    if not total > 0:
        raise LoramboError("allocator=gora: every layer's gradient is zero on the estimation batches; "
                           "raise sensitivity.gradient_batches or check the task's labels")
    cap = max(min_rank, round(max_rank_factor * uniform_rank(layers, p_max)))
    target = {layer.name: p_max * importance[layer.name] / total / layer.cost for layer in layers}
    ranks = {layer.name: min(min_rank, layer.max_rank) for layer in layers}
    spent = allocation_cost(ranks, layers)
    if spent > p_max:
        raise LoramboError(f"allocator=gora: min_rank={min_rank} everywhere costs {spent:,} > P_max={p_max:,}; "
                           f"lower allocator.min_rank or raise the budget")
    # one rank at a time to the layer furthest below its target; one that no longer fits never will again
    heap = [(ranks[l.name] - target[l.name], i) for i, l in enumerate(layers)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        layer = layers[i]
        if ranks[layer.name] >= min(cap, layer.max_rank) or spent + layer.cost > p_max:
            continue
        ranks[layer.name] += 1
        spent += layer.cost
        heapq.heappush(heap, (ranks[layer.name] - target[layer.name], i))
    return ranks
