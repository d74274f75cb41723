"""Frobenius greedy (water-filling): rank goes to the layer whose next singular value of its target matrix
(the weight W_i, or an early estimate of the update: `target: update`) removes the most squared error per
parameter, sigma_{r_i+1}^2 / c_i."""

from lorambo.allocators import register
from lorambo.allocators.greedy import greedy_fill, spectrum_gain


def _needs(target: str = "weight", **_) -> set[str]:
    return {"weight_spectra" if target == "weight" else "update_spectra"}


@register("frobenius_greedy", required_stats=_needs)
def frobenius_greedy_ranks(layers, p_max, stats, target: str = "weight", **_) -> dict[str, int]:
    spectra = stats["weight_spectra" if target == "weight" else "update_spectra"]
    return greedy_fill(layers, p_max, spectrum_gain(spectra))
