"""ARD-LoRA (paper 002, `method=ard_lora`): learnable rank scales per layer and per attention head, read as METHODS.md section 3.

Every adapted layer starts at rank R = ceil(alpha_max * r0) (r0: the uniform rank of the budget), clipped to the
smallest layer's maximum rank. A scale
alpha > 0 per layer, or per head for attention projections, sets the effective rank r = round(r0 * alpha); the
cut is differentiable through a soft mask over rank index j, sigmoid((r0 * alpha - j - 1/2) / tau) (> 1/2 exactly
for the kept j < round(r0 alpha)). The scales train with their own learning rate under the task loss
+ lambda_1 sum |alpha| + lambda_2 TV(alpha across layers of the same kind). At the end the scales are rescaled by
one factor (bisection) so that the true parameter count meets P_max, ranks are cut to integers, the soft mask is
folded into B, and the tensors shrink.

Per head: a head's output rows use the first r_h components of the layer's shared rank space,
dW[rows_h] = B[rows_h, :r_h] A[:r_h]; its true cost is max_h r_h * d_in + sum_h r_h * d_head. PEFT has no per-head
form, so the saved adapter has the layer rank max_h r_h with zeros in B beyond each head's r_h: it holds exactly
`adapter_params` non-zero entries (what is counted), and `adapter_params_peft_form` entries in all.
"""

import math
import re

import torch
from pydantic import Field
from torch import nn

from lorambo.adapters import ADAPTER, adapter_parameter_count, adapter_ranks, lora_layers, set_rank, wrap_lora
from lorambo.allocators import allocate
from lorambo.budget import LayerSpec
from lorambo.methods import NoOptions, register
from lorambo.methods.lora import Lora


SCALES = "ard_rank_scales"  # the scales' module in the model (not saved in the adapter: PEFT keeps lora_ keys)


def soft_mask(alpha: torch.Tensor, r0: float, rank: int, tau: float) -> torch.Tensor:
    """(heads, rank) mask: component j of head h is kept to the degree sigmoid((r0 alpha_h - j - 1/2) / tau)."""
    j = torch.arange(rank, dtype=alpha.dtype, device=alpha.device)
    return torch.sigmoid((r0 * alpha[:, None] - j - 0.5) / tau)


def l1_penalty(alphas: list[torch.Tensor]) -> torch.Tensor:
    return sum(a.abs().sum() for a in alphas)


def tv_penalty(alphas_by_depth: list[list[torch.Tensor]]) -> torch.Tensor:
    """Total variation along depth: for each kind of layer (same name but the layer index), sum over consecutive
    layers of |alpha_{l+1} - alpha_l| (per head)."""
    total = torch.zeros(())
    for chain in alphas_by_depth:
        for a, b in zip(chain, chain[1:]):
            total = total + (b - a).abs().sum()
    return total


def depth_chains(names: list[str]) -> list[list[str]]:
    """Layers grouped by kind (the name with its first numeric component replaced), ordered by that number."""
    chains = {}
    for name in names:
        match = re.search(r"\.(\d+)\.", name)
        kind = re.sub(r"\.(\d+)\.", ".*.", name, count=1) if match else name
        chains.setdefault(kind, []).append((int(match.group(1)) if match else 0, name))
    return [[n for _, n in sorted(chain)] for chain in chains.values()]


def head_groups(model: nn.Module, layers: list[LayerSpec], per_head_modules: str | None) -> dict[str, int]:
    """Number of scale groups per layer: its heads for attention projections (fused q/k/v: 3 x heads), else 1."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or getattr(
        config, "num_heads", None)
    head_dim = getattr(config, "d_kv", None) or (getattr(config, "hidden_size", 0) // heads if heads else None)
    groups = {}
    for layer in layers:
        per_head = per_head_modules and heads and head_dim and re.search(per_head_modules, layer.name)
        groups[layer.name] = layer.d_out // head_dim if per_head and layer.d_out % head_dim == 0 else 1
    return groups


def true_parameter_count(ranks: dict[str, list[int]], layers: dict[str, LayerSpec]) -> int:
    total = 0
    for name, head_ranks in ranks.items():
        layer, h = layers[name], len(head_ranks)
        total += max(head_ranks) * layer.d_in + sum(head_ranks) * (layer.d_out // h)
    return total


def ard_rank(r0: int, layers: list[LayerSpec], alpha_max: float) -> int:
    """The rank every layer is built at, R = ceil(alpha_max r0), clipped to the smallest layer's maximum rank
    (PEFT builds one rank for all): the masks and the cut use this same R."""
    return min(math.ceil(alpha_max * r0), min(l.max_rank for l in layers))


class RankScales:
    """The scales, the masking hooks on a PEFT LoRA model at rank R, the regulariser, and the final cut."""

    def __init__(self, peft_model: nn.Module, layers: list[LayerSpec], groups: dict[str, int], r0: int,
                 p_max: int, options):
        self.model, self.r0, self.p_max, self.options = peft_model, r0, p_max, options
        self.layers = {l.name: l for l in layers}
        self.modules = lora_layers(peft_model)
        self.rank = ard_rank(r0, layers, options.alpha_max)
        self.names = sorted(self.modules)
        # alpha = 1: uniform r0 to start; each scale on its layer's device, and registered in the model, so that
        # whatever moves or wraps the model (accelerate's prepare, DDP's gradient averaging) moves and wraps them
        self.log_alpha = nn.ParameterList(
            [nn.Parameter(torch.zeros(groups[n], device=self.modules[n].lora_A[ADAPTER].weight.device))
             for n in self.names])
        peft_model.add_module(SCALES, self.log_alpha)
        self.chains = depth_chains(self.names)
        self.handles = [self._hook(n, self.modules[n], p) for n, p in zip(self.names, self.log_alpha)]

    def parameters(self):
        return list(self.log_alpha)

    def alphas(self) -> dict[str, torch.Tensor]:
        return {n: p.exp() for n, p in zip(self.names, self.log_alpha)}

    def _hook(self, name, module, log_alpha):
        lora_A, lora_B = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
        heads = log_alpha.shape[0]

        if heads == 1:  # one mask on the rank dimension, between A and B
            def mask_rank(_, __, z):
                m = soft_mask(log_alpha.exp(), self.r0, self.rank, self.options.tau)[0].to(z.dtype)
                return z * (m[None, :, None, None] if z.dim() == 4 else m)
            return lora_A.register_forward_hook(mask_rank)

        def per_head_output(_, inputs, __):  # each head's rows see their own mask
            z = inputs[0]
            m = soft_mask(log_alpha.exp(), self.r0, self.rank, self.options.tau).to(z.dtype)  # (H, R)
            B = lora_B.weight.reshape(heads, -1, self.rank)  # (H, d_head, R)
            y = torch.einsum("...r,hr,hdr->...hd", z, m, B)
            return y.reshape(*z.shape[:-1], -1)
        return lora_B.register_forward_hook(per_head_output)

    def regularizer(self) -> torch.Tensor:
        alphas = self.alphas()
        return (self.options.lambda_l1 * l1_penalty(list(alphas.values()))
                + self.options.lambda_tv * tv_penalty([[alphas[n] for n in chain] for chain in self.chains]))

    def integer_ranks(self, factor: float) -> dict[str, list[int]]:
        ranks = {}
        for name, alpha in self.alphas().items():
            r = torch.clamp(torch.round(self.r0 * factor * alpha.detach()), 0, self.rank).long().tolist()
            ranks[name] = r if max(r) > 0 else [1] + r[1:]  # PEFT refuses rank 0: a layer keeps one
        return ranks

    def budget_factor(self) -> float:
        """The largest common factor on every alpha whose integer ranks fit P_max (bisection; count rises with it)."""
        fits = lambda c: true_parameter_count(self.integer_ranks(c), self.layers) <= self.p_max
        lo, hi = 0.0, 1.0
        while fits(hi) and hi < 1e6:
            lo, hi = hi, hi * 2
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    @torch.no_grad()
    def finalize(self) -> dict[str, list[int]]:
        """Cut to integer ranks at the budget: fold the soft mask into B, zero each head's columns beyond its
        rank, shrink A and B to the layer's largest head rank, and remove the hooks."""
        factor = self.budget_factor()
        ranks = self.integer_ranks(factor)
        for handle in self.handles:
            handle.remove()
        for name, log_alpha in zip(self.names, self.log_alpha):
            module, head_ranks = self.modules[name], ranks[name]
            heads, keep = len(head_ranks), max(head_ranks)
            m = soft_mask(log_alpha.exp(), self.r0, self.rank, self.options.tau)  # the mask training saw
            lora_A, lora_B = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
            B = lora_B.weight.reshape(heads, -1, self.rank, *lora_B.weight.shape[2:]).clone()
            shape = (heads, 1, self.rank) + (1,) * (B.dim() - 3)
            B *= m.reshape(shape).to(B.dtype)
            for h, r in enumerate(head_ranks):
                B[h, :, r:] = 0
            B = B.reshape(lora_B.weight.shape)[:, :keep]
            A = lora_A.weight[:keep].clone()
            lora_A.weight = nn.Parameter(A)
            lora_B.weight = nn.Parameter(B.contiguous())
            set_rank(module, keep)
        self.final_ranks = ranks
        return ranks


@register("ard_lora")
class ArdLora(Lora):
    """A rank-R LoRA with learnable rank scales, its own rate for them, a regulariser, and the cut at the end."""

    uses_allocator = False  # its ranks come from its scales
    class Options(NoOptions):
        alpha_max: float = Field(ge=1)
        tau: float = Field(gt=0)
        lambda_l1: float = Field(ge=0)
        lambda_tv: float = Field(ge=0)
        alpha_lr: float = Field(gt=0)
        per_head: bool

    def label(self) -> str:
        return self.name

    def wrap(self, model, p_max, ranks, stats):
        r0 = allocate("uniform", self.layers, p_max)[self.layers[0].name]
        rank = ard_rank(r0, self.layers, self.opts.alpha_max)
        model = wrap_lora(model, {l.name: rank for l in self.layers}, self.cfg.model.head_modules, self.cfg.lora,
                          uniform_rank=r0)
        groups = head_groups(model.get_base_model(), self.layers, self.cfg.model.get("per_head_modules")
                             if self.opts.per_head else None)
        self.scales = RankScales(model, self.layers, groups, r0, p_max, self.opts)
        return model

    def param_groups(self, model) -> list[dict]:
        # the rank scales learn at their own rate, without weight decay
        scales = {id(p) for p in self.scales.parameters()}
        adapter = [p for p in model.parameters() if p.requires_grad and id(p) not in scales]
        return [{"params": adapter},
                {"params": self.scales.parameters(), "lr": self.opts.alpha_lr, "weight_decay": 0.0}]

    def loss_term(self):
        return self.scales.regularizer()

    def state(self, model) -> dict:
        return {**super().state(model), "ard": [p.detach().cpu().clone() for p in self.scales.parameters()]}

    def load_state(self, model, state: dict) -> None:
        super().load_state(model, state)
        with torch.no_grad():
            for p, value in zip(self.scales.parameters(), state["ard"]):
                p.copy_(value)

    def counts(self, model) -> dict:
        """Integer ranks at the budget (the cut): what is evaluated and saved is the cut adapter."""
        final = self.scales.finalize()
        return {"ranks": adapter_ranks(model),
                "adapter_params": true_parameter_count(final, {l.name: l for l in self.layers}),
                "head_ranks": {n: r for n, r in final.items() if len(r) > 1},
                "adapter_params_peft_form": adapter_parameter_count(model)}
