"""Data-weighted: with G_i = E[x x^T] of the layer's inputs, the error of a rank-r update is
||(W_i - X) G_i^{1/2}||_F^2, whose best value is the tail of the spectrum of W_i G_i^{1/2}
(METHODS.md section 2: the paper's Tr((W-X)^T G (W-X)) only type-checks transposed). Greedy on those spectra."""

from lorambo.allocators import register
from lorambo.allocators.greedy import greedy_fill, spectrum_gain


@register("data_weighted", required_stats=lambda **_: {"weighted_spectra"})
def data_weighted_ranks(layers, p_max, stats, **_) -> dict[str, int]:
    return greedy_fill(layers, p_max, spectrum_gain(stats["weighted_spectra"]))
