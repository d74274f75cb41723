"""LoRA and DoRA through PEFT's LoraConfig, at the per-layer ranks the allocator chose under P_max."""

import os

import torch
from omegaconf import OmegaConf

from lorambo.adapters import (ADAPTER, adapter_parameter_count, adapter_ranks, expected_parameter_count, grow_rank,
                              lora_config, lora_layers, sync_peft_config, wrap_lora)
from lorambo.allocators import initialise_adapter
from lorambo.allocators.uniform import uniform_rank
from lorambo.errors import LoramboError
from lorambo.methods import Method, register
from lorambo.plots import plot_ranks


def trainable_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_tensors(model, tensors: dict, complete: bool = False) -> None:
    """A checkpoint's tensors into the model (`complete`: they must cover all of it)."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or (complete and missing):
        raise LoramboError(f"checkpoint does not fit this model ({(unexpected or missing)[0]}, ...); "
                           f"resume a run with its own config")


def save_adapter(model, run_dir: str) -> None:
    """PEFT's adapter folder; when the classes have names (a local file's), the base config beside it, so that
    the adapter's folder says what each output means (`config.json`'s id2label)."""
    path = os.path.join(run_dir, "adapter")
    model.save_pretrained(path)
    config = getattr(model.get_base_model(), "config", None)
    labels = getattr(config, "id2label", None) or {}
    if any(name != f"LABEL_{i}" for i, name in labels.items()):
        config.save_pretrained(path)


def plot_final_ranks(method: Method, metrics: dict) -> None:
    if method.is_main:
        plot_ranks(metrics["ranks"], [l.name for l in method.layers], os.path.join(method.run_dir, "ranks.png"),
                   f"{method.label()}: {metrics['adapter_params']:,} adapter parameters")


@register("lora")
class Lora(Method):
    """Plain LoRA: the allocator's ranks, each layer's scale from `lora.scaling`."""

    uses_allocator = True
    use_dora = False
    has_scale_policy = True

    def label(self) -> str:
        return self.cfg.allocator.name

    def wrap(self, model, p_max, ranks, stats):
        model = wrap_lora(model, ranks, self.cfg.model.head_modules, self.cfg.lora, self.use_dora,
                          uniform_rank(self.layers, p_max))
        if adapter_parameter_count(model) != expected_parameter_count(ranks, self.layers, self.use_dora):
            raise RuntimeError("adapter tensors do not hold sum r_i c_i parameters")
        # EVA, GoRA: the allocator also says how the adapter starts
        options = OmegaConf.to_container(self.cfg.allocator, resolve=True)
        initialise_adapter(self.cfg.allocator.name, model, stats, options)
        return model

    def adapter_config(self, p_max, ranks):
        return lora_config(ranks, self.cfg.model.head_modules, self.cfg.lora, self.use_dora,
                           uniform_rank(self.layers, p_max))

    def state(self, model) -> dict:
        return {"model": trainable_tensors(model), "ranks": adapter_ranks(model)}

    def load_state(self, model, state: dict) -> None:
        """Layers first grown to the ranks they had (wrapped at the starting ranks, whose scale they keep)."""
        specs = {l.name: l for l in self.layers}
        for name, layer in lora_layers(model).items():
            extra = state["ranks"][name] - int(layer.r[ADAPTER])
            if extra > 0:
                grow_rank(layer, torch.zeros(extra, specs[name].d_in), None)
        load_tensors(model, state["model"])

    def counts(self, model) -> dict:
        return {"ranks": adapter_ranks(model), "adapter_params": adapter_parameter_count(model)}

    def finish(self, model, step: int) -> dict:
        metrics = {**self.counts(model), "lora_scaling": self.cfg.lora.scaling}  # the update scale policy
        plot_final_ranks(self, metrics)
        return metrics

    def save(self, model, run_dir: str) -> None:
        """PEFT's format (`PeftModel.from_pretrained(base, run_dir/adapter)`), its config holding the real ranks."""
        sync_peft_config(model)
        save_adapter(model, run_dir)


@register("dora")
class Dora(Lora):
    """DoRA (PEFT's use_dora): each adapted layer's magnitude vector (d_out parameters) is paid for first, the
    allocator spreads the rest."""

    use_dora = True

    def label(self) -> str:
        allocator = self.cfg.allocator.name
        return "dora" if allocator == "uniform" else f"dora_{allocator}"

    def fixed_cost(self) -> int:
        return sum(layer.d_out for layer in self.layers)
