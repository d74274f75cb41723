"""Uniform: the same rank r everywhere, each layer clipped to its maximum rank; r is the largest that fits.
With no clipping this is r = floor(P_max / sum_i c_i) (../shared/METHODS.md section 1); when small layers
saturate, their unspent share lets r rise for the others."""

from lorambo.allocators import register
from lorambo.budget import LayerSpec, allocation_cost
from lorambo.errors import LoramboError


def uniform_cost(layers: list[LayerSpec], r: int) -> int:
    return allocation_cost({layer.name: min(r, layer.max_rank) for layer in layers}, layers)


@register("uniform")
def uniform_ranks(layers: list[LayerSpec], p_max: int, stats: dict, **_) -> dict[str, int]:
    total_cost = sum(layer.cost for layer in layers)
    r = p_max // total_cost
    if r < 1:
        raise LoramboError(
            f"budget P_max={p_max:,} is below uniform rank 1 ({total_cost:,} params); "
            f"choose budget=r1 or larger"
        )
    top = max(layer.max_rank for layer in layers)
    while r < top and uniform_cost(layers, r + 1) <= p_max:
        r += 1
    return {layer.name: min(r, layer.max_rank) for layer in layers}


def uniform_rank(layers: list[LayerSpec], p_max: int) -> float:
    """r_u, the rank uniform gives at P_max (the matched scale policy's reference): its common rank, or where
    rank 1 everywhere does not fit, the fraction P_max / sum_i c_i."""
    total_cost = sum(layer.cost for layer in layers)
    if p_max < total_cost:
        return p_max / total_cost
    return max(uniform_ranks(layers, p_max, {}).values())
