"""Rank allocators: each a small module with one pure function from layer specs and statistics to ranks,
registered by name with the statistics it needs. `allocate(name, layers, p_max, stats, **options)` is the
single entry point; `required_stats(name, **options)` says what to estimate first. An allocator that also
chooses how its adapter starts (EVA, GoRA) registers `initialise(peft_model, stats, **options)`, which
`initialise_adapter` calls right after wrapping."""

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Callable

from lorambo.budget import LayerSpec, check_allocation
from lorambo.errors import LoramboError


@dataclass(frozen=True)
class Allocator:
    allocate: Callable[..., dict[str, int]]
    required_stats: Callable[..., set[str]]
    initialise: Callable | None = None
    peft_start: Callable | None = None  # (LoraConfig, task_type) -> how it starts, set in the config if PEFT can


ALLOCATORS: dict[str, Allocator] = {}


def register(name: str, required_stats: Callable[..., set[str]] = lambda **options: set(),
             initialise: Callable | None = None, peft_start: Callable | None = None):
    def wrap(fn):
        ALLOCATORS[name] = Allocator(fn, required_stats, initialise, peft_start)
        return fn

    return wrap


def import_allocators() -> None:
    """Every module of this package, so that each registers itself (no hand-kept list)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def _get(name: str) -> Allocator:
    import_allocators()
    if name not in ALLOCATORS:
        raise LoramboError(f"unknown allocator '{name}'; choose one of: {', '.join(sorted(ALLOCATORS))}")
    return ALLOCATORS[name]


def allocator_parameters(name: str) -> set[str]:
    """The options an allocator reads: its allocation and statistics functions' keyword parameters."""
    allocator = _get(name)
    names = set()
    for fn in (allocator.allocate, allocator.required_stats, allocator.initialise or (lambda: None)):
        names |= {p.name for p in list(inspect.signature(fn).parameters.values())
                  if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)}
    return names


def allocator_option_model(name: str):
    """A pydantic model of the allocator's options, typed by its functions' annotations: a list given where a rank
    belongs is refused in one line before anything is built, not deep in the allocation."""
    from pydantic import ConfigDict, create_model

    allocator = _get(name)
    fields = {}
    for fn in (allocator.allocate, allocator.required_stats, allocator.initialise or (lambda: None)):
        for p in inspect.signature(fn).parameters.values():
            if p.name in allocator_parameters(name) and p.annotation is not p.empty:
                fields[p.name] = (p.annotation, p.default)
    return create_model(f"{name}_options", __config__=ConfigDict(extra="allow"), **fields)


def required_stats(name: str, **options) -> set[str]:
    return _get(name).required_stats(**options)


def initialises(name: str) -> bool:
    return _get(name).initialise is not None


def initialise_adapter(name: str, peft_model, stats: dict, options: dict) -> bool:
    """The allocator's own start for the adapter (True), or PEFT's default start left as it is (False);
    `options`: the allocator's config (its start reads its own keys). A resumed run's statistics are only what
    its checkpoint keeps; its tensors come from the checkpoint anyway."""
    allocator = _get(name)
    if allocator.initialise is None or not allocator.required_stats(**options) <= set(stats):
        return False
    own = inspect.signature(allocator.initialise).parameters
    allocator.initialise(peft_model, stats, **{k: v for k, v in options.items() if k in own and k != "stats"})
    return True


def peft_start(name: str, config, task_type: str) -> str:
    """How an adapter built from this allocator's PEFT config starts (set in `config` where PEFT has the start)."""
    allocator = _get(name)
    if allocator.peft_start is None:
        return "PEFT's default: A random, B zero (as lorambo trains it)"
    return allocator.peft_start(config, task_type)


def allocate(name: str, layers: list[LayerSpec], p_max: int, stats: dict | None = None, **options) -> dict[str, int]:
    ranks = _get(name).allocate(layers, p_max, stats or {}, **options)
    check_allocation(ranks, layers, p_max)
    return {name: r for name, r in ranks.items() if r > 0}  # r=0: the layer is not adapted
