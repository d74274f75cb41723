"""The run's devices and processes: accelerate's Accelerator as lorambo configures it."""

import os

import torch


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.logger.name == "none" else "wandb",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # several processes without GPUs (torchrun on CPUs): accelerate runs them data-parallel on gloo only
        # when told they are CPU processes; otherwise each would train alone
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
    )


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
