"""Choosing a run's ranks: the statistics its allocator and method need, measured on the base model, then the
allocator under P_max (less the method's fixed cost), or ranks reused from another run. Used the same way by
the runner (lorambo/train.py) and the benchmark harness."""

import os
import time

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lorambo.allocators import (allocate, allocator_option_model, allocator_parameters, import_allocators, initialises,
                                required_stats)
from lorambo.allocators.greedy import left_out
from lorambo.allocators.uniform import uniform_rank
from lorambo.budget import allocation_cost
from lorambo.errors import LoramboError
from lorambo.evaluation import loss_and_logits
from lorambo.methods import check_options, import_named_module
from lorambo.models import head_parameters
from lorambo.results import write_json_atomic
from lorambo.schema import validate_options
from lorambo.sensitivity import WEIGHT_GRADIENT_STATS, estimate, warmed_up_head
from lorambo.sensitivity import summary as sensitivity_summary


def allocator_options(allocator_cfg, method_cfg=None) -> dict:
    """The allocator's own settings, as keyword arguments of its allocation function; an unknown key (a typo,
    or an option of another allocator or of the method) is a one-line error naming the known ones."""
    import_allocators()
    import_named_module(allocator_cfg, "allocator")
    options = {k: v for k, v in OmegaConf.to_container(allocator_cfg, resolve=True).items()
               if k not in ("name", "module", "report_order", "from_run")}
    check_options(options, allocator_parameters(allocator_cfg.name), f"allocator {allocator_cfg.name}",
                  {"method.": list(method_cfg or {})})
    validate_options(allocator_option_model(allocator_cfg.name), options, "allocator.")
    return options


def needed_statistics(cfg, method) -> set[str]:
    """What to estimate on the base model: the allocator's statistics (unless its ranks come from another run)
    and the method's own."""
    needed = set(method.required_stats())
    # reused ranks need no statistics, unless the allocator also starts the adapter from them (EVA, GoRA)
    if method.uses_allocator and (not cfg.allocator.get("from_run") or initialises(cfg.allocator.name)):
        needed |= required_stats(cfg.allocator.name, **allocator_options(cfg.allocator, cfg.method))
    return needed


def check_statistics_fit_the_base(cfg, method, required: set[str]) -> None:
    """A 4-bit base has no gradients with respect to its weights (they are packed integers): refuse what needs
    them in one line, and say what works."""
    needs = sorted(required & WEIGHT_GRADIENT_STATS)
    if cfg.model.get("quantize") and needs:
        raise LoramboError(
            f"{method.label()} needs gradients with respect to the base weights ({', '.join(needs)}), which a "
            f"4-bit base (model.quantize) does not have; use allocator uniform, frobenius_greedy, data_weighted "
            f"or eva, or allocate on the unquantised base (lorambo-allocate) and reuse it with allocator.from_run")


def measure(required: set[str], cfg, model, layers, data, device, num_processes: int, p_max: int) -> dict:
    """The statistics, on estimation batches, with the head optionally warmed up first (then restored).
    EVA's r is the uniform rank at this budget (a layer then holds at most rho r directions, PEFT's cap)."""
    batches = estimation_batches(data, cfg, device, num_processes)
    model = model.to(device)
    output_fn = lambda m, b: loss_and_logits(m, b, cfg.task.type)
    # a random head is not the model being adapted: optionally fit it alone first; the trained run starts
    # from the untouched head all the same (every allocator trains from the same start)
    with warmed_up_head(model, head_parameters(model, cfg.model.head_modules), batches, output_fn,
                        cfg.sensitivity.head_warmup_steps, cfg.sensitivity.head_warmup_lr):
        return estimate(required, model, layers, batches, output_fn, cfg.sensitivity, cfg.seed, cfg.task.type,
                        rank=max(1, round(uniform_rank(layers, p_max))))


def choose_ranks(cfg, method, model, layers, p_max, data, accelerator, run_dir) -> dict:
    """{"ranks", "stats", "seconds"}: the starting ranks (empty for a method that chooses its own), the
    statistics measured (the method reads its own from them), and the seconds spent measuring."""
    if not method.trains_adapter:
        return {"ranks": {}, "stats": {}, "seconds": 0.0}
    start, stats = time.perf_counter(), {}
    required = needed_statistics(cfg, method)
    check_statistics_fit_the_base(cfg, method, required)
    if required:
        stats = measure(required, cfg, model, layers, data, accelerator.device, accelerator.num_processes, p_max)
        if accelerator.is_main_process:
            write_json_atomic(os.path.join(run_dir, "sensitivities.json"), sensitivity_summary(stats))
    seconds = time.perf_counter() - start if required else 0.0
    ranks = {}
    if method.uses_allocator:
        ranks = allocator_ranks(cfg, method, layers, p_max, stats)
        if accelerator.is_main_process:
            write_allocation(cfg, method, layers, p_max, ranks, stats, required, run_dir)
    return {"ranks": ranks, "stats": stats, "seconds": seconds}


def allocator_ranks(cfg, method, layers, p_max: int, stats: dict) -> dict[str, int]:
    if cfg.allocator.get("from_run"):
        return ranks_from_run(cfg.allocator.from_run, layers, p_max - method.fixed_cost())
    fixed = method.fixed_cost()
    if fixed and p_max - fixed < sum(l.cost for l in layers):
        raise LoramboError(f"budget P_max={p_max:,} cannot pay {method.label()}'s fixed {fixed:,} parameters "
                           f"(DoRA: its magnitude vectors) and rank 1 everywhere; choose a larger budget")
    return allocate(cfg.allocator.name, layers, p_max - fixed, stats, **allocator_options(cfg.allocator, cfg.method))


def write_allocation(cfg, method, layers, p_max, ranks, stats, required, run_dir) -> None:
    """allocation.json: the starting ranks, what chose them, and every statistic with its error bars."""
    write_json_atomic(os.path.join(run_dir, "allocation.json"), {
        "allocator": method.label(), "p_max": p_max, "ranks": ranks,
        "statistics": sorted(required) if not cfg.allocator.get("from_run") else [],
        "from_run": cfg.allocator.get("from_run"), "lora_scaling": cfg.lora.scaling,
        "shapes": {l.name: [l.d_out, l.d_in] for l in layers},  # what a reuse (allocator.from_run) is checked against
        **left_out(layers, p_max, ranks),
        "sensitivity": {name: {layer: {"mean": stats[f"{name}_raw"][layer], **bars}
                               for layer, bars in per_layer.items()}
                        for name, per_layer in stats.get("errors", {}).items()}})


def ranks_from_run(path: str, layers, p_max: int) -> dict[str, int]:
    """Reuse another run's allocation (the final ranks in its metrics.json, else its allocation.json), only on
    the layers it was made for: the same names, all of them, of the same shapes."""
    import json

    found = {}
    for file in ("metrics.json", "allocation.json"):
        try:
            with open(os.path.join(path, file)) as f:
                found[file] = json.load(f)
        except (OSError, ValueError):
            pass
    if not found:
        raise LoramboError(f"allocator.from_run='{path}' has no readable allocation.json or metrics.json; "
                           f"point it at a run folder (or a lorambo-allocate folder)")
    ranks = next(record["ranks"] for record in found.values())
    allocation = found.get("allocation.json", {})
    known = {l.name: l for l in layers}
    unknown = sorted(set(ranks) - set(known))
    missing = sorted(set(known) - set(ranks) - set(allocation.get("left_out", [])))
    other_shape = [n for n, shape in allocation.get("shapes", {}).items()
                   if n in known and list(shape) != [known[n].d_out, known[n].d_in]]
    if unknown or missing or other_shape:
        what = (f"name layers this model does not have ({unknown[0]}, ...)" if unknown
                else f"do not cover {len(missing)} of this model's {len(known)} adapted layers ({missing[0]}, ...)"
                if missing else f"were made for layers of other shapes ({other_shape[0]}: "
                                f"{allocation['shapes'][other_shape[0]]}, here {known[other_shape[0]].d_out} x "
                                f"{known[other_shape[0]].d_in})")
        raise LoramboError(f"allocator.from_run='{path}' ranks {what}; reuse a run of the same model and "
                           f"model.target_modules")
    cost = allocation_cost(ranks, layers)
    if cost > p_max:
        raise LoramboError(f"allocator.from_run allocation costs {cost:,} > P_max={p_max:,}; use that run's budget")
    return ranks


def estimation_batches(data, cfg, device, num_processes: int = 1) -> list[dict]:
    """The first batches of a separately seeded shuffle of the training split, for sensitivity estimation.
    Batches of the global batch size, the same in every process: N processes allocate as one process would."""
    s = cfg.sensitivity
    n = max(s.gradient_batches, s.hessian_batches, s.covariance_batches, s.fisher_batches, s.head_warmup_steps)
    loader = DataLoader(data.train, batch_size=cfg.train.batch_size * num_processes, shuffle=True,
                        collate_fn=data.collate_fn,
                        generator=torch.Generator().manual_seed(cfg.seed + 1))
    return [{k: v.to(device) for k, v in batch.items()} for _, batch in zip(range(n), loader)]
