"""DoRA (baseline in paper 002): uniform ranks at the budget, where each adapted layer's magnitude vector
(d_out parameters) is paid for first."""

from lorambo.allocators import register
from lorambo.allocators.uniform import uniform_ranks
from lorambo.errors import LoramboError


@register("dora")
def dora_ranks(layers, p_max, stats, **_) -> dict[str, int]:
    magnitudes = sum(layer.d_out for layer in layers)
    if p_max - magnitudes < sum(layer.cost for layer in layers):
        raise LoramboError(f"budget P_max={p_max:,} cannot pay DoRA's magnitude vectors ({magnitudes:,}) and "
                           f"rank 1 everywhere; choose a larger budget")
    return uniform_ranks(layers, p_max - magnitudes, stats)
