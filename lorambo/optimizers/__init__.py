"""The optimizers a run can use, by name (config group `optimizer`): AdamW, and GaLore / AdaRankGrad, which
project the gradients of the parameter groups marked `low_rank` (full fine-tuning marks the adaptable layers)."""

import inspect

import torch
from omegaconf import OmegaConf

from lorambo.errors import LoramboError
from lorambo.optimizers.low_rank import AdaRankGrad, GaLore

OPTIMIZERS = {"adamw": torch.optim.AdamW, "galore": GaLore, "adarankgrad": AdaRankGrad}


# set from train.* for every optimizer, so not its own options
FROM_TRAIN = ("params", "lr", "weight_decay")


def optimizer_options(optimizer_cfg) -> dict:
    """The optimizer's own keyword arguments, each known to its constructor and of its default's type (a typo or
    a list where a rank belongs is one line before anything is built, not a TypeError in the constructor)."""
    from pydantic import ConfigDict, create_model

    from lorambo.methods import check_options
    from lorambo.schema import validate_options

    name = optimizer_cfg.name
    if name not in OPTIMIZERS:
        raise LoramboError(f"unknown optimizer '{name}'; choose one of: {', '.join(sorted(OPTIMIZERS))}")
    options = {k: v for k, v in OmegaConf.to_container(optimizer_cfg, resolve=True).items()
               if k not in ("name", "report_order")}
    parameters = {p.name: p for p in inspect.signature(OPTIMIZERS[name].__init__).parameters.values()
                  if p.name not in ("self", *FROM_TRAIN) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    check_options(options, parameters, f"optimizer {name}")
    typed = {n: (type(p.default), p.default) for n, p in parameters.items()
             if isinstance(p.default, (bool, int, float, str, tuple))}
    validate_options(create_model(f"{name}_options", __config__=ConfigDict(extra="allow"), **typed), options,
                     "optimizer.")
    return options


def build_optimizer(optimizer_cfg, train_cfg, groups: list[dict]):
    name = optimizer_cfg.name
    options = optimizer_options(optimizer_cfg)
    if name != "adamw" and not any(group.get("low_rank") for group in groups):
        raise LoramboError(f"optimizer={name} trains all weights with low-rank gradients; use method=full_ft "
                           f"(or optimizer=adamw with a LoRA method)")
    if name == "adamw":
        groups = [{k: v for k, v in group.items() if k != "low_rank"} for group in groups]
    return OPTIMIZERS[name](groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, **options)


def build_scheduler(train_cfg, optimizer, steps: int, num_processes: int):
    """train.scheduler (transformers' get_scheduler: linear, cosine, ...) after train.warmup_ratio of the steps.
    accelerate steps a prepared scheduler once per process at each optimizer step (it assumes a schedule written
    for one process), so the schedule is laid out in those units, as Hugging Face's own scripts do."""
    from transformers import get_scheduler

    n = num_processes
    return get_scheduler(train_cfg.get("scheduler", "linear"), optimizer,
                         num_warmup_steps=int(train_cfg.warmup_ratio * steps) * n, num_training_steps=steps * n)
