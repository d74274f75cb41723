"""Rank allocators: each a small module with one pure function from layer specs and statistics to ranks,
registered by name with the statistics it needs. `allocate(name, layers, p_max, stats, **options)` is the
single entry point; `required_stats(name, **options)` says what to estimate first."""

from dataclasses import dataclass
from typing import Callable

from lorambo.budget import LayerSpec, check_allocation
from lorambo.errors import LoramboError


@dataclass(frozen=True)
class Allocator:
    allocate: Callable[..., dict[str, int]]
    required_stats: Callable[..., set[str]]


ALLOCATORS: dict[str, Allocator] = {}


def register(name: str, required_stats: Callable[..., set[str]] = lambda **options: set()):
    def wrap(fn):
        ALLOCATORS[name] = Allocator(fn, required_stats)
        return fn

    return wrap


def _get(name: str) -> Allocator:
    if name not in ALLOCATORS:
        raise LoramboError(f"unknown allocator '{name}'; choose one of: {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name]


def required_stats(name: str, **options) -> set[str]:
    return _get(name).required_stats(**options)


def allocate(name: str, layers: list[LayerSpec], p_max: int, stats: dict | None = None, **options) -> dict[str, int]:
    ranks = _get(name).allocate(layers, p_max, stats or {}, **options)
    check_allocation(ranks, layers, p_max)
    return {name: r for name, r in ranks.items() if r > 0}  # r=0: the layer is not adapted


from lorambo.allocators import (  # noqa: E402,F401  (each registers itself)
    data_weighted, dora, frobenius_greedy, gradient, hessian_offline, hessian_online, uniform)
