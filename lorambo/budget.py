"""Budget and cost accounting shared by every allocator (../shared/METHODS.md section 1)."""

from dataclasses import dataclass

from lorambo.errors import LoramboError


@dataclass(frozen=True)
class LayerSpec:
    """One adaptable weight. `d_out` x `d_in` is its matrix shape as LoRA sees it:
    Linear/Conv1D (out, in); Conv2d (c_out, c_in*kh*kw), since PEFT's A is the full-kernel conv."""

    name: str
    d_out: int
    d_in: int
    kind: str = "linear"  # linear | conv1d | conv2d

    @property
    def cost(self) -> int:
        """Adapter parameters per unit of rank, c_i."""
        return self.d_out + self.d_in

    @property
    def max_rank(self) -> int:
        return min(self.d_out, self.d_in)


def resolve_p_max(budget, layers: list[LayerSpec]) -> int:
    """P_max from a budget config: absolute (`p_max`) or matching uniform rank R (`rank`, times `scale`)."""
    if budget.kind == "absolute":
        p_max = int(budget.p_max)
    elif budget.kind == "match_uniform":
        p_max = int(budget.rank * sum(layer.cost for layer in layers) * budget.get("scale", 1.0))
    else:
        raise LoramboError(f"unknown budget.kind '{budget.kind}'; use 'absolute' or 'match_uniform'")
    check_budget(p_max, layers)
    return p_max


def budget_label(budget) -> str:
    """A budget as tables name it: `r4`, `r4x1.12` (12% above uniform r=4), `12M`."""
    if budget.kind == "absolute":
        return f"{budget.p_max / 1e6:g}M"
    scale = budget.get("scale", 1.0)
    return f"r{budget.rank}" if scale == 1.0 else f"r{budget.rank}x{scale:g}"


def check_budget(p_max: int, layers: list[LayerSpec]) -> None:
    smallest = min(layer.cost for layer in layers)
    full = sum(layer.cost * layer.max_rank for layer in layers)
    if p_max < smallest:
        raise LoramboError(
            f"budget P_max={p_max:,} is smaller than one rank of the cheapest layer ({smallest:,} params); "
            f"choose a larger budget, e.g. budget=r1"
        )
    if p_max > full:
        raise LoramboError(
            f"budget P_max={p_max:,} exceeds full rank on every layer ({full:,} params); "
            f"choose a smaller budget or method=full_ft"
        )


def allocation_cost(ranks: dict[str, int], layers: list[LayerSpec]) -> int:
    """sum_i r_i c_i: what an allocation costs in adapter parameters (the one cost function)."""
    by_name = {layer.name: layer for layer in layers}
    return sum(r * by_name[name].cost for name, r in ranks.items())


def check_allocation(ranks: dict[str, int], layers: list[LayerSpec], p_max: int) -> None:
    """An allocator's output must respect the budget and each layer's bounds: a bug, not a user error."""
    by_name = {layer.name: layer for layer in layers}
    for name, r in ranks.items():
        assert name in by_name, f"allocator returned unknown layer {name}"
        assert 0 <= r <= by_name[name].max_rank, f"rank {r} out of bounds for {name}"
    assert allocation_cost(ranks, layers) <= p_max, "allocation exceeds the budget"
