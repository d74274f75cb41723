"""AdaLoRA through PEFT (`method=adalora`): starts above the budget and prunes to it during training.

target_r = round(P_max / sum_i (c_i + 1)); update_and_allocate runs after every optimizer step; adapter_params
counts the ranks its final pattern keeps (A row + B column + singular value each)."""

import re

from pydantic import Field
from torch import nn

from lorambo.adapters import ADAPTER, adapter_ranks
from lorambo.budget import LayerSpec
from lorambo.errors import LoramboError
from lorambo.methods import Method, NoOptions, register
from lorambo.methods.lora import load_tensors, plot_final_ranks, save_adapter, trainable_tensors


def adalora_target_rank(layers: list[LayerSpec], p_max: int) -> int:
    """AdaLoRA keeps target_r ranks per layer on average, each costing d_out + d_in + 1 (A row, B column,
    singular value): the target_r whose uniform cost is nearest P_max. Nearest, not the largest that fits: at
    uniform LoRA r's budget that is r, AdaLoRA's own budget for that row (its Table 1: total rank r x layers),
    where the largest that fits is r - 1 (the singular values tip it over), half the budget at r = 2."""
    return round(p_max / sum(layer.cost + 1 for layer in layers))


def wrap_adalora(model: nn.Module, layers: list[LayerSpec], p_max: int, head_modules, lora_cfg, options,
                 total_steps: int) -> nn.Module:
    """PEFT's AdaLoRA on the same layers: budget mapped to target_r, starting from init_r_ratio x target_r;
    the pruning schedule (tinit, tfinal) as fractions of the run."""
    from peft import AdaLoraConfig, get_peft_model

    if any(layer.kind == "conv2d" for layer in layers):
        # measured: on tiny_resnet PEFT's AdaLoRA kept 20 of its 51-rank budget, pruning every bottleneck conv
        raise LoramboError("method=adalora does not support convolutions (PEFT's AdaLoRA prunes them below "
                           "its budget); use method=dora or a LoRAMBo allocator for this model")
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


@register("adalora")
class AdaLora(Method):
    class Options(NoOptions):
        init_r_ratio: float = Field(ge=1)
        tinit_fraction: float = Field(ge=0, lt=1)
        tfinal_fraction: float = Field(ge=0, lt=1)
        delta_t: int = Field(ge=1)
        orth_reg_weight: float = Field(ge=0)

    def wrap(self, model, p_max, ranks, stats):
        return wrap_adalora(model, self.layers, p_max, self.cfg.model.head_modules, self.cfg.lora, self.opts,
                            self.steps)

    restored_scores = None  # importance scores from a checkpoint, not yet placed

    def after_optimizer_step(self, model, step: int) -> None:
        from accelerate.utils import extract_model_from_parallel

        model = extract_model_from_parallel(model)
        if self.restored_scores is not None:
            self.restore_scores(model)
        model.base_model.update_and_allocate(step)

    def restore_scores(self, model) -> None:
        """Each restored score on the device of the parameter it scores (AdaLoRA names them as its inner model
        does)."""
        allocator = model.base_model.rankallocator
        devices = {n: p.device for n, p in model.base_model.model.named_parameters()}
        for k, scores in self.restored_scores.items():
            setattr(allocator, k, {n: v.to(devices[n]) for n, v in scores.items()})
        self.restored_scores = None

    def state(self, model) -> dict:
        """AdaLoRA masks rather than shrinks: its tensors keep their shapes; its importance scores go along."""
        allocator = model.base_model.rankallocator
        return {"model": trainable_tensors(model),
                "adalora": {k: getattr(allocator, k) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")},
                "rank_pattern": model.peft_config[ADAPTER].rank_pattern}

    def load_state(self, model, state: dict) -> None:
        load_tensors(model, state["model"])
        # a checkpoint is read on the host, and this runs before the model is placed on its device: the scores
        # go to the device of the parameter each scores at the first step (restore_scores)
        self.restored_scores = state["adalora"]
        model.peft_config[ADAPTER].rank_pattern = state["rank_pattern"]

    def finish(self, model, step: int) -> dict:
        ranks = {n: r for n, r in adalora_effective_ranks(model).items() if r > 0}
        cost = {l.name: l.cost + 1 for l in self.layers}  # A row, B column and one singular value per rank
        metrics = {"ranks": ranks, "adapter_params": sum(r * cost[n] for n, r in ranks.items()),
                   "lora_scaling": None}
        plot_final_ranks(self, metrics)
        return metrics

    def save(self, model, run_dir: str) -> None:
        save_adapter(model, run_dir)
