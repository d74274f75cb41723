"""The optimizers a run can use, by name (config group `optimizer`): AdamW, and GaLore / AdaRankGrad, which
project the gradients of the parameter groups marked `low_rank` (full fine-tuning marks the adaptable layers)."""

import torch
from omegaconf import OmegaConf

from lorambo.errors import LoramboError
from lorambo.optimizers.low_rank import AdaRankGrad, GaLore

OPTIMIZERS = {"adamw": torch.optim.AdamW, "galore": GaLore, "adarankgrad": AdaRankGrad}


def build_optimizer(optimizer_cfg, train_cfg, groups: list[dict]):
    name = optimizer_cfg.name
    options = {k: v for k, v in OmegaConf.to_container(optimizer_cfg, resolve=True).items() if k not in ("name", "report_order")}
    if name != "adamw" and not any(group.get("low_rank") for group in groups):
        raise LoramboError(f"optimizer={name} trains all weights with low-rank gradients; use method=full_ft "
                           f"(or optimizer=adamw with a LoRA method)")
    if name == "adamw":
        groups = [{k: v for k, v in group.items() if k != "low_rank"} for group in groups]
    return OPTIMIZERS[name](groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, **options)
