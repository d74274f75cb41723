"""Hessian offline: s_i = Tr(H_i) (Hutchinson) or ||H_i||_op (power iteration, `sensitivity: hessian_opnorm`);
ranks by the budget-exact square-root law (`variant: sqrt_law`), or by the knapsack variant: greedy on the
curves s_i * sigma_j(W_i)^2 (`variant: knapsack`)."""

from lorambo.allocators import register
from lorambo.allocators.greedy import greedy_fill, spectrum_gain, square_root_allocation


def _needs(sensitivity: str = "hessian_trace", variant: str = "sqrt_law", **_) -> set[str]:
    return {sensitivity} | ({"weight_spectra"} if variant == "knapsack" else set())


@register("hessian_offline", required_stats=_needs)
def hessian_offline_ranks(layers, p_max, stats, sensitivity: str = "hessian_trace", variant: str = "sqrt_law",
                          **_) -> dict[str, int]:
    s = stats[sensitivity]
    if variant == "knapsack":
        return greedy_fill(layers, p_max, spectrum_gain(stats["weight_spectra"], s))
    return square_root_allocation(layers, p_max, s)
