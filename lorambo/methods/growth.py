"""Online rank growth (paper 000 Sec. 2.6, `method=growth`; `allocator=hessian_online` selects it): at each
event step, measure each layer's full-weight gradient on that step, decide by marginal benefit per parameter
(lorambo/allocators/hessian_online.py holds the pure decisions), and grow the real tensors (adapters.grow_rank)."""

import os
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lorambo.adapters import ADAPTER, adapter_ranks, factor_matrices, grow_rank, lora_layers
from lorambo.allocators.hessian_online import event_steps, growth_decision, marginal_benefits, mean_curvatures
from lorambo.budget import LayerSpec, allocation_cost
from lorambo.methods import NoOptions, register
from lorambo.methods.lora import Lora
from lorambo.plots import plot_rank_history
from lorambo.results import append_jsonl, read_jsonl
from lorambo.sensitivity import layer_inputs_as_rows


class GradientCapture:
    """Forward hooks on the LoRA layers keeping each layer's input and the gradient of its output on one step;
    from them, the gradient with respect to the layer's full weight, sum_calls sum_tokens grad_out^T x. A layer
    can run more than once per forward (DeBERTa passes its relative-position embeddings through query_proj and
    key_proj too): every call's share is summed, as autograd sums them into the weight's gradient."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers, self.calls, self.handles = layers, {}, []

    def __enter__(self):
        for name, module in self.layers.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def capture(module, inputs, output):
            if torch.is_grad_enabled() and output.requires_grad:
                x = inputs[0].detach()
                output.register_hook(lambda g: self.calls.setdefault(name, []).append((x, g.detach())))
        return capture

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def weight_gradients(self) -> dict[str, torch.Tensor]:
        grads = {}
        for name, module in self.layers.items():
            base = module.get_base_layer()
            for x, g in self.calls.get(name, []):
                x = layer_inputs_as_rows(base, x).float()
                g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) if g.dim() == 4 else g.reshape(-1, g.shape[-1])
                grads[name] = grads.get(name, 0) + g.float().t() @ x
        self.calls = {}
        return grads


def residual(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """G with the adapter's current subspaces projected out: (I - P_B) G (I - P_A), P_A onto A's row space,
    P_B onto B's column space (empty while B is still zero)."""
    def basis(M):
        if M.numel() == 0 or float(M.abs().max()) == 0.0:
            return None
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        return U[:, S > S[0] * 1e-6]

    R = G
    QA = basis(A.t().double())
    if QA is not None:
        R = R - (R @ QA) @ QA.t()
    QB = basis(B.double())
    if QB is not None:
        R = R - QB @ (QB.t() @ R)
    return R


def singular_values_and_right_vectors(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, Vh) of R = U S Vh, descending, from the eigendecomposition of the smaller Gram matrix (R R^T or
    R^T R) instead of an SVD: several times faster for the wide layer gradients of a growth event, and exact
    to about eps x sigma_max^2 / sigma_j^2 relative, far below what a growth decision tells apart (the
    directions of negligible sigma_j are never grown: their benefit sigma_j^2 / 2h is negligible too)."""
    d_out, d_in = R.shape
    if d_out < d_in:
        eigenvalues, U = torch.linalg.eigh(R @ R.t())
        S = eigenvalues.clamp_min(0).sqrt().flip(0)
        U = U.flip(1)
        Vh = U.t() @ R  # rows sigma_j v_j^T: normalised (a row of a zero sigma_j stays a unit vector of noise)
        Vh = Vh / Vh.norm(dim=1, keepdim=True).clamp_min(torch.finfo(R.dtype).tiny)
    else:
        eigenvalues, V = torch.linalg.eigh(R.t() @ R)
        S = eigenvalues.clamp_min(0).sqrt().flip(0)
        Vh = V.flip(1).t()
    return S, Vh


class OnlineGrowth:
    """At each of its event steps, measure on that step, decide, and grow. An event's share of the remaining
    budget is remaining / events left: a share too small for any layer is carried to the next event (it is
    not spent, so the next share is larger); growth ends early only when no layer has a positive benefit."""

    def __init__(self, layers: list[LayerSpec], p_max: int, traces: dict[str, float], options, run_dir: str,
                 total_steps: int):
        self.layers, self.p_max, self.options, self.run_dir = layers, p_max, options, run_dir
        self.curvature, self.no_curvature = mean_curvatures(layers, traces)
        self.steps = event_steps(total_steps, options.growth_events, options.get("grow_every"))
        self.events_left, self.events_held = len(self.steps), 0
        self.stopped = None  # why growth ended before its last event, if it did
        self.history_path = os.path.join(run_dir, "rank_history.jsonl")
        self.capture = None

    def state(self) -> dict:
        return {"events_left": self.events_left, "events_held": self.events_held, "stopped": self.stopped}

    def load_state(self, state: dict) -> None:
        self.events_left, self.events_held, self.stopped = (state["events_left"], state["events_held"],
                                                            state["stopped"])

    def due(self, step: int) -> bool:
        return self.events_left > 0 and step == self.steps[len(self.steps) - self.events_left]

    def outcome(self, ranks: dict[str, int]) -> dict:
        """What metrics.json says of growth: events held, parameters left unspent, and why."""
        spent = allocation_cost(ranks, self.layers)
        unspent = self.p_max - spent
        if self.stopped:
            why = self.stopped
        elif self.events_left:
            why = f"the run ended with {self.events_left} growth events still to come"
        else:
            why = "all growth events held"
        return {"growth_events": self.events_held, "growth_event_steps": self.steps,
                "growth_unspent_params": unspent, "growth_ended": why,
                "growth_no_curvature_layers": self.no_curvature}

    def measuring(self, peft_model):
        self.capture = GradientCapture(lora_layers(peft_model))
        return self.capture

    def record(self, step: int, ranks: dict[str, int]) -> None:
        append_jsonl(self.history_path, {"step": step, "ranks": ranks})

    def grow(self, step: int, peft_model, optimizer, accelerator) -> dict[str, int]:
        """One growth event; returns the rank increments (identical in every process)."""
        from accelerate.utils import broadcast_object_list

        layers = lora_layers(peft_model)
        grads = self.capture.weight_gradients()
        self.capture = None
        ranks = {name: int(m.r[ADAPTER]) for name, m in layers.items()}
        spent = allocation_cost(ranks, self.layers)
        budget = (self.p_max - spent) // self.events_left
        self.events_left -= 1
        self.events_held += 1
        decision = [None]
        benefits, directions = {}, {}
        for name in sorted(grads):
            G = accelerator.reduce(grads[name], reduction="mean")  # every process sees the same estimate
            A, B = factor_matrices(layers[name])
            S, Vh = singular_values_and_right_vectors(residual(G.double(), A.detach(), B.detach()))
            benefits[name] = marginal_benefits(S.cpu().numpy(), self.curvature[name])
            directions[name] = Vh
        if accelerator.is_main_process:
            growable = any(ranks[l.name] < l.max_rank and len(benefits.get(l.name, ())) and
                           benefits[l.name][0] > 0 for l in self.layers)
            decision[0] = (growth_decision(self.layers, ranks, budget, benefits), growable)
        broadcast_object_list(decision)  # one decision, taken once, applied everywhere
        increments, growable = decision[0]
        for name, k in increments.items():
            A, _ = factor_matrices(layers[name])
            row_norm = A.detach().norm(dim=1).mean() if A.shape[0] else 1.0
            grow_rank(layers[name], directions[name][:k].float() * row_norm, optimizer)
        if not growable:  # no layer has a positive benefit left: growth is over
            self.events_left = 0
            self.stopped = f"no layer had a positive benefit at step {step}"
        if accelerator.is_main_process:
            self.record(step, {n: int(m.r[ADAPTER]) for n, m in layers.items()})
        return increments


@register("growth")
class Growth(Lora):
    """LoRA from the allocator's starting ranks, grown at `growth_events` event steps until P_max is spent."""

    class Options(NoOptions):
        curvature: Literal["fisher_trace", "hessian_trace"]
        grow_every: int | None = Field(ge=1)  # null: the events spread over the first half of the run
        growth_events: int = Field(ge=1)

    def required_stats(self) -> set[str]:
        return {self.opts.curvature}

    def adapter_config(self, p_max, ranks):
        return None  # its ranks grow while it trains

    def wrap(self, model, p_max, ranks, stats):
        model = super().wrap(model, p_max, ranks, stats)
        # the raw, unfloored traces: growth divides by them and handles unusable ones itself
        self.growth = OnlineGrowth(self.layers, p_max, stats[f"{self.opts.curvature}_raw"], self.opts,
                                   self.run_dir, self.steps)
        if self.is_main and not os.path.exists(self.growth.history_path):  # a resumed run has its start
            self.growth.record(0, ranks)
        return model

    def measuring(self, step: int, model):
        return self.growth.measuring(model) if self.growth.due(step) else super().measuring(step, model)

    def after_step(self, step: int, model, optimizer, accelerator) -> bool:
        if self.growth.capture is None:  # not a measured step
            return False
        increments = self.growth.grow(step, model, optimizer, accelerator)
        if increments:
            accelerator.log({f"rank/{n}": r for n, r in adapter_ranks(model).items()}, step=step)
        return bool(increments)

    def state(self, model) -> dict:
        return {**super().state(model), "growth": self.growth.state()}

    def load_state(self, model, state: dict) -> None:
        super().load_state(model, state)
        self.growth.load_state(state["growth"])

    def finish(self, model, step: int) -> dict:
        metrics = super().finish(model, step)
        metrics.update(self.growth.outcome(metrics["ranks"]))
        # the last event spends what positive benefits can take; budget is left only if the run ended first
        if self.growth.events_left and metrics["growth_unspent_params"] >= min(l.cost for l in self.layers):
            metrics["warning"] = (f"{self.label()} left {metrics['growth_unspent_params']:,} of "
                                  f"P_max={self.growth.p_max:,} unspent ({metrics['growth_ended']}); set "
                                  f"method.grow_every or train longer")
        if self.is_main:
            self.growth.record(step, metrics["ranks"])
            plot_rank_history(read_jsonl(self.growth.history_path), [l.name for l in self.layers],
                              os.path.join(self.run_dir, "rank_history.png"),
                              f"{self.label()}: rank of every layer over training")
        return metrics
