"""Rank allocators: each a small module with one pure function from layer specs (and statistics)
to ranks, registered by name. `allocate(name, layers, p_max, stats)` is the single entry point."""

from typing import Callable

from lorambo.budget import LayerSpec, check_allocation
from lorambo.errors import LoramboError

AllocateFn = Callable[..., dict[str, int]]
ALLOCATORS: dict[str, AllocateFn] = {}


def register(name: str):
    def wrap(fn: AllocateFn) -> AllocateFn:
        ALLOCATORS[name] = fn
        return fn

    return wrap


def allocate(name: str, layers: list[LayerSpec], p_max: int, stats: dict | None = None, **options) -> dict[str, int]:
    if name not in ALLOCATORS:
        raise LoramboError(f"unknown allocator '{name}'; choose one of: {', '.join(sorted(ALLOCATORS))}")
    ranks = ALLOCATORS[name](layers, p_max, stats or {}, **options)
    check_allocation(ranks, layers, p_max)
    return {name: r for name, r in ranks.items() if r > 0}  # r=0: the layer is not adapted


from lorambo.allocators import uniform  # noqa: E402,F401  (registers)
