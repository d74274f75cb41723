"""Wrapping a base model in a PEFT LoRA adapter with per-layer ranks, counting what it really holds, and the
surgery that changes a wrapped layer's rank in place (online growth grows it, ARD-LoRA cuts it).

PEFT has no way to change a LoRA layer's rank in place, so `grow_rank` and `set_rank` do it by hand: rows are
appended to A and (zero) columns to B, the layer's scale of the existing components is kept (so the model's
function is unchanged at that moment), and the optimizer state is carried over (new entries start at zero)."""

import re

import torch
from torch import nn

from lorambo.budget import LayerSpec, allocation_cost
from lorambo.errors import LoramboError


def rank_pattern_key(module_name: str) -> str:
    """PEFT matches rank_pattern keys as regexes against a dotted suffix, first match wins: escape the full name
    and anchor it so each key hits exactly one module (a stem `conv1` must not catch `layer1.0.conv1`). PEFT looks
    a name up both as the base model names it and, in its EVA code, with the PeftModel's `base_model.model.`
    prefix: the key takes either."""
    return rf"^(base_model\.model\.)?{re.escape(module_name)}$"


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


def lora_config(ranks: dict[str, int], head_modules, lora_cfg, use_dora: bool = False,
                uniform_rank: float | None = None):
    """PEFT's LoraConfig for exactly `ranks`: every layer's rank and alpha under anchored pattern keys, the alphas
    set by `lora_cfg.scaling` (`uniform_rank`: r_u of the budget, needed by `matched`)."""
    from peft import LoraConfig

    default_r = max(ranks.values())
    alphas = lora_alphas(ranks, lora_cfg.alpha, lora_cfg.scaling, uniform_rank or default_r)
    default_alpha = alphas[max(ranks, key=lambda n: ranks[n])]
    return LoraConfig(
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


def wrap_lora(model: nn.Module, ranks: dict[str, int], head_modules, lora_cfg, use_dora: bool = False,
              uniform_rank: float | None = None) -> nn.Module:
    """A PEFT LoRA model with exactly `ranks` (the config of `lora_config`)."""
    from peft import get_peft_model

    config = lora_config(ranks, head_modules, lora_cfg, use_dora, uniform_rank)
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
    return allocation_cost(ranks, layers) + (sum(by_name[n].d_out for n in ranks) if dora else 0)


def effective_scalings(peft_model: nn.Module) -> dict[str, float]:
    """Each LoRA layer's update scale as PEFT applies it (layer.scaling), read from the wrapped model."""
    return {name: float(m.scaling[ADAPTER]) for name, m in lora_layers(peft_model).items()}


def factor_matrices(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A as (r, d_in) and B as (d_out, r), whatever the layer type (Conv2d: A's kernel flattened)."""
    A = layer.lora_A[ADAPTER].weight
    B = layer.lora_B[ADAPTER].weight
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)


def _replace_parameter(module: nn.Module, new: torch.Tensor, optimizer, old_slice) -> None:
    """Swap module.weight for `new` (old values already copied in), in the optimizer too: every state tensor of
    the parameter's shape grows the same way with zeros in the new entries; scalars (step) are kept."""
    old = module.weight
    param = nn.Parameter(new, requires_grad=old.requires_grad)
    module.weight = param
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [param if p is old else p for p in group["params"]]
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old.shape:
                grown = torch.zeros_like(new)
                grown[old_slice] = value
                state[key] = grown
        optimizer.state[param] = state


@torch.no_grad()
def grow_rank(layer, new_rows: torch.Tensor, optimizer=None) -> None:
    """Raise the layer's rank by len(new_rows): A gets `new_rows` (each of length d_in), B gets zero columns."""
    k = new_rows.shape[0]
    if k == 0:
        return
    r = layer.r[ADAPTER]
    lora_A, lora_B = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    A, B = lora_A.weight, lora_B.weight
    new_A = torch.cat([A, new_rows.reshape(k, *A.shape[1:]).to(A)], dim=0)
    new_B = torch.cat([B, torch.zeros(B.shape[0], k, *B.shape[2:], dtype=B.dtype, device=B.device)], dim=1)
    _replace_parameter(lora_A, new_A, optimizer, (slice(0, r),))
    _replace_parameter(lora_B, new_B, optimizer, (slice(None), slice(0, r)))
    set_rank(layer, r + k)


def set_rank(layer, rank: int) -> None:
    """Record a LoRA layer's new rank after its factors were replaced. The scale of the existing components
    stays; alpha follows so that alpha/r (rsLoRA: alpha/sqrt r) still equals it, and a saved adapter reloads
    with the same scale."""
    lora_A, lora_B = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    if isinstance(lora_A, nn.Conv2d):
        lora_A.out_channels, lora_B.in_channels = rank, rank
    else:
        lora_A.out_features, lora_B.in_features = rank, rank
    scale = layer.scaling[ADAPTER]
    layer.r[ADAPTER] = rank
    layer.lora_alpha[ADAPTER] = scale * (rank ** 0.5 if layer.use_rslora.get(ADAPTER, False) else rank)


def sync_peft_config(peft_model: nn.Module) -> None:
    """Write the layers' real ranks and alphas into the PEFT config, so the saved adapter reloads as it is."""
    config = peft_model.peft_config[ADAPTER]
    layers = lora_layers(peft_model)
    config.rank_pattern = {rank_pattern_key(n): int(m.r[ADAPTER]) for n, m in layers.items()}
    config.alpha_pattern = {rank_pattern_key(n): float(m.lora_alpha[ADAPTER]) for n, m in layers.items()}
