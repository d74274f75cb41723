"""Full fine-tuning (`method=full_ft`): every weight trains, no adapter and no budget, with any optimizer; the
low-rank-gradient optimizers (GaLore, AdaRankGrad) project the adaptable layers' weights and this method
records their projection ranks (paper 003's effective rank)."""

import os
import statistics

import torch
from pydantic import Field

from lorambo.methods import Method, NoOptions, register
from lorambo.methods.lora import load_tensors
from lorambo.plots import plot_rank_history
from lorambo.results import append_jsonl, read_jsonl


class ProjectionRanks:
    """The rank of every layer's gradient projection over training: summed every step (for the time
    average), written to rank_history.jsonl at log steps."""

    def __init__(self, model, layers, run_dir):
        self.names = {id(model.get_submodule(l.name).weight): l.name for l in layers}
        self.sums, self.count = {}, 0
        self.history_path = os.path.join(run_dir, "rank_history.jsonl")

    def update(self, optimizer, step: int, record: bool) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        ranks = {self.names[i]: r for i, r in inner.projection_ranks().items() if i in self.names}
        for name, r in ranks.items():
            self.sums[name] = self.sums.get(name, 0) + r
        self.count += 1
        if record:
            append_jsonl(self.history_path, {"step": step, "ranks": ranks})

    def time_averaged(self) -> dict[str, float]:
        return {name: total / self.count for name, total in self.sums.items()}


@register("full_ft")
class FullFineTuning(Method):
    class Options(NoOptions):
        lr: float = Field(gt=0)  # its own learning rate (model.full_ft_lr), read by train.lr
    trains_adapter = False

    def wrap(self, model, p_max, ranks, stats):
        for p in model.parameters():
            p.requires_grad_(True)
        low_rank = self.cfg.optimizer.name != "adamw"
        self.projection = ProjectionRanks(model, self.layers, self.run_dir) if low_rank else None
        return model

    def param_groups(self, model) -> list[dict]:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if self.projection is None:
            return [{"params": trainable}]
        # low-rank gradient projection for the adaptable layers' weights, plain AdamW for every other tensor
        matrices = set(self.projection.names)
        return [{"params": [p for p in trainable if id(p) in matrices], "low_rank": True},
                {"params": [p for p in trainable if id(p) not in matrices]}]

    def after_step(self, step: int, model, optimizer, accelerator) -> bool:
        if self.projection is not None:
            log_every = self.cfg.train.log_every
            self.projection.update(optimizer, step, record=step % log_every == 0 or step == self.steps)
        return False

    def state(self, model) -> dict:
        """The whole state, buffers too (batch-norm statistics train with every weight)."""
        return {"model": {n: t.detach().cpu().clone() for n, t in model.state_dict().items()},
                "projection_ranks": (self.projection.sums, self.projection.count) if self.projection else None}

    def load_state(self, model, state: dict) -> None:
        load_tensors(model, state["model"], complete=True)
        if self.projection is not None:
            self.projection.sums, self.projection.count = state["projection_ranks"]

    def finish(self, model, step: int) -> dict:
        metrics = {"ranks": {}, "adapter_params": 0, "lora_scaling": None}
        if self.projection is not None:  # paper 003's effective rank: each layer's projection rank over steps
            metrics["projection_ranks"] = self.projection.time_averaged()
            metrics["effective_rank"] = statistics.mean(metrics["projection_ranks"].values())
            if self.is_main:
                plot_rank_history(read_jsonl(self.projection.history_path), [l.name for l in self.layers],
                                  os.path.join(self.run_dir, "rank_history.png"),
                                  f"{self.cfg.optimizer.name}: projection rank of every layer over training")
        return metrics

    def save(self, model, run_dir: str) -> None:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(os.path.join(run_dir, "model"))
        else:
            os.makedirs(os.path.join(run_dir, "model"), exist_ok=True)
            torch.save(model.state_dict(), os.path.join(run_dir, "model", "model.pt"))
