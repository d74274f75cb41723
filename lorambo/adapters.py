"""Wrapping a base model in a PEFT LoRA adapter with per-layer ranks, and counting what it really holds."""

import re

from torch import nn

from lorambo.budget import LayerSpec


def rank_pattern_key(module_name: str) -> str:
    """PEFT matches rank_pattern keys as regexes against a dotted suffix, first match wins:
    escape the full name so each key hits exactly one module."""
    return rf"^{re.escape(module_name)}$"


def wrap_lora(model: nn.Module, ranks: dict[str, int], head_modules, lora_cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    default_r = max(ranks.values())
    config = LoraConfig(
        r=default_r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        use_rslora=lora_cfg.rslora,
        use_dora=lora_cfg.get("dora", False),
        # a regex PEFT full-matches against each module name: a plain list would match by suffix, so the
        # stem `conv1` would also catch every `layerN.M.conv1`
        target_modules=rf"^({'|'.join(re.escape(name) for name in sorted(ranks))})$",
        rank_pattern={rank_pattern_key(name): r for name, r in ranks.items() if r != default_r},
        modules_to_save=list(head_modules) or None,
    )
    peft_model = get_peft_model(model, config)
    got = adapter_ranks(peft_model)
    if got != ranks:  # PEFT's pattern matching must give every module exactly the rank asked for
        wrong = {n: (ranks.get(n), got.get(n)) for n in set(ranks) | set(got) if ranks.get(n) != got.get(n)}
        raise RuntimeError(f"PEFT ranks differ from the allocation (asked, got): {wrong}")
    return peft_model


def _base_name(peft_name: str) -> str:
    """Module name in the base model from its name inside a PeftModel."""
    return peft_name.removeprefix("base_model.model.")


def adapter_ranks(peft_model: nn.Module) -> dict[str, int]:
    """Rank of every adapted module, read from the real lora_A tensors."""
    from peft.tuners.lora import LoraLayer

    ranks = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            ranks[_base_name(name)] = module.lora_A["default"].weight.shape[0]
    return ranks


def adapter_parameter_count(peft_model: nn.Module) -> int:
    """Trainable adapter parameters (LoRA factors and DoRA magnitudes), head excluded."""
    return sum(p.numel() for n, p in peft_model.named_parameters()
               if p.requires_grad and ("lora_" in n) and "modules_to_save" not in n)


def expected_parameter_count(ranks: dict[str, int], layers: list[LayerSpec]) -> int:
    by_name = {layer.name: layer for layer in layers}
    return sum(r * by_name[n].cost for n, r in ranks.items())
