"""Wrapping a base model in a PEFT LoRA adapter with per-layer ranks, and counting what it really holds."""

import re

from torch import nn

from lorambo.budget import LayerSpec
from lorambo.errors import LoramboError


def rank_pattern_key(module_name: str) -> str:
    """PEFT matches rank_pattern keys as regexes against a dotted suffix, first match wins:
    escape the full name so each key hits exactly one module."""
    return rf"^{re.escape(module_name)}$"


SCALINGS = ("matched", "per_layer", "rslora")


def lora_alphas(ranks: dict[str, int], alpha: float, scaling: str, uniform_rank: float) -> dict[str, float]:
    """Each layer's lora_alpha under a scale policy (PEFT scales layer i's update by alpha_i / r_i, rsLoRA by
    alpha_i / sqrt(r_i)):
    - matched: every layer gets uniform's scale at the same budget, alpha / r_u: alpha_i = alpha r_i / r_u (so a
      non-uniform allocation changes ranks only, not per-layer step sizes; a uniform run is unchanged);
    - per_layer: alpha_i = alpha (scale alpha / r_i: PEFT's default; the scale falls as the rank rises);
    - rslora: alpha_i = alpha with rsLoRA's alpha / sqrt(r_i)."""
    if scaling not in SCALINGS:
        raise LoramboError(f"unknown lora.scaling '{scaling}'; choose one of: {', '.join(SCALINGS)}")
    if scaling != "matched":
        return {name: alpha for name in ranks}
    # alpha * r first: exact for a layer at the uniform rank (alpha r_u / r_u == alpha, to the bit)
    return {name: alpha * r / uniform_rank for name, r in ranks.items()}


def wrap_lora(model: nn.Module, ranks: dict[str, int], head_modules, lora_cfg, use_dora: bool = False,
              uniform_rank: float | None = None) -> nn.Module:
    """A PEFT LoRA model with exactly `ranks`, its alphas set by `lora_cfg.scaling` (`uniform_rank`: r_u of the
    budget, needed by `matched`)."""
    from peft import LoraConfig, get_peft_model

    default_r = max(ranks.values())
    alphas = lora_alphas(ranks, lora_cfg.alpha, lora_cfg.scaling, uniform_rank or default_r)
    default_alpha = alphas[max(ranks, key=lambda n: ranks[n])]
    config = LoraConfig(
        r=default_r,
        lora_alpha=default_alpha,
        alpha_pattern={rank_pattern_key(name): a for name, a in alphas.items() if a != default_alpha},
        lora_dropout=lora_cfg.dropout,
        use_rslora=lora_cfg.scaling == "rslora",
        use_dora=use_dora,
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


ADAPTER = "default"  # PEFT's adapter name; lorambo uses one adapter per model


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA-wrapped module, by its name in the base model."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): m for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def adapter_ranks(peft_model: nn.Module) -> dict[str, int]:
    """Rank of every adapted module, read from the real lora_A tensors."""
    return {name: m.lora_A[ADAPTER].weight.shape[0] for name, m in lora_layers(peft_model).items()}


def adapter_parameter_count(peft_model: nn.Module) -> int:
    """Trainable adapter parameters (LoRA factors and DoRA magnitudes), head excluded."""
    return sum(p.numel() for n, p in peft_model.named_parameters()
               if p.requires_grad and ("lora_" in n) and "modules_to_save" not in n)


def expected_parameter_count(ranks: dict[str, int], layers: list[LayerSpec], dora: bool = False) -> int:
    """sum_i r_i c_i, plus DoRA's magnitude vector (d_out per adapted layer)."""
    by_name = {layer.name: layer for layer in layers}
    return sum(r * by_name[n].cost + (by_name[n].d_out if dora else 0) for n, r in ranks.items())


def adalora_target_rank(layers: list[LayerSpec], p_max: int) -> int:
    """AdaLoRA keeps target_r ranks per layer on average, each costing d_out + d_in + 1 (A row, B column,
    singular value): the largest target_r whose uniform cost fits P_max."""
    return p_max // sum(layer.cost + 1 for layer in layers)


def wrap_adalora(model: nn.Module, layers: list[LayerSpec], p_max: int, head_modules, lora_cfg, options,
                 total_steps: int) -> nn.Module:
    """PEFT's AdaLoRA on the same layers: budget mapped to target_r, starting from init_r_ratio x target_r;
    the pruning schedule (tinit, tfinal) as fractions of the run."""
    from peft import AdaLoraConfig, get_peft_model

    if any(layer.kind == "conv2d" for layer in layers):
        # measured: on tiny_resnet PEFT's AdaLoRA kept 20 of its 51-rank budget, pruning every bottleneck conv
        raise LoramboError("allocator=adalora does not support convolutions (PEFT's AdaLoRA prunes them below "
                           "its budget); use allocator=dora or a LoRAMBo allocator for this model")
    target_r = adalora_target_rank(layers, p_max)
    if target_r < 1:
        raise LoramboError(f"budget P_max={p_max:,} is below AdaLoRA's target rank 1 "
                           f"({sum(l.cost + 1 for l in layers):,} params); choose a larger budget")
    tinit, tfinal = int(options.tinit_fraction * total_steps), int(options.tfinal_fraction * total_steps)
    if total_steps - tinit - tfinal < 1:
        tinit, tfinal = 0, 0
    config = AdaLoraConfig(
        init_r=max(target_r, round(options.init_r_ratio * target_r)), target_r=target_r, tinit=tinit,
        tfinal=tfinal, deltaT=options.delta_t, orth_reg_weight=options.orth_reg_weight, total_step=total_steps,
        lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=rf"^({'|'.join(re.escape(l.name) for l in layers)})$",
        modules_to_save=list(head_modules) or None,
    )
    return get_peft_model(model, config)


def adalora_effective_ranks(peft_model: nn.Module) -> dict[str, int]:
    """Ranks AdaLoRA kept (its rank pattern's True entries; before any pruning, the full init_r)."""
    pattern = peft_model.peft_config["default"].rank_pattern
    if not pattern:
        return adapter_ranks(peft_model)
    return {key.removeprefix("base_model.model.").removesuffix(".default").removesuffix(".lora_E"): int(sum(mask))
            for key, mask in pattern.items()}


def effective_scalings(peft_model: nn.Module) -> dict[str, float]:
    """Each LoRA layer's update scale as PEFT applies it (layer.scaling), read from the wrapped model."""
    return {name: float(m.scaling[ADAPTER]) for name, m in lora_layers(peft_model).items()}
