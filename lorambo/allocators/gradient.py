"""Gradient sensitivity: s_i = mean_t ||grad_{W_i} L_t||_F^2 over warm-up batches, ranks by the budget-exact
square-root law."""

from lorambo.allocators import register
from lorambo.allocators.greedy import square_root_allocation


@register("gradient", required_stats=lambda **_: {"gradient"})
def gradient_ranks(layers, p_max, stats, **_) -> dict[str, int]:
    return square_root_allocation(layers, p_max, stats["gradient"])
