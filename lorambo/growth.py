"""Online rank growth of a PEFT LoRA model: measuring, deciding, and growing the real tensors.

PEFT has no way to change a LoRA layer's rank in place, so `grow_rank` does it by hand: it appends rows to A
and (zero) columns to B, keeps the layer's scale alpha/r of the existing components (so the model's function
is unchanged at the moment of growth), and carries the optimizer state over (new entries start at zero).
"""

import json
import os

import torch
from torch import nn

from lorambo.adapters import ADAPTER, lora_layers, rank_pattern_key
from lorambo.allocators.hessian_online import event_steps, growth_decision, marginal_benefits, mean_curvatures
from lorambo.budget import LayerSpec
from lorambo.sensitivity import layer_inputs_as_rows

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


class GradientCapture:
    """Forward hooks on the LoRA layers keeping each layer's input and the gradient of its output on one step;
    from them, the gradient with respect to the layer's full weight, sum_tokens grad_out^T x."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers, self.inputs, self.output_grads, self.handles = layers, {}, {}, []

    def __enter__(self):
        for name, module in self.layers.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def capture(module, inputs, output):
            if torch.is_grad_enabled() and output.requires_grad:
                self.inputs[name] = inputs[0].detach()
                output.register_hook(lambda g: self.output_grads.__setitem__(name, g.detach()))
        return capture

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def weight_gradients(self) -> dict[str, torch.Tensor]:
        grads = {}
        for name, module in self.layers.items():
            if name in self.inputs and name in self.output_grads:
                base = module.get_base_layer()
                x = layer_inputs_as_rows(base, self.inputs[name]).float()
                g = self.output_grads[name]
                g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) if g.dim() == 4 else g.reshape(-1, g.shape[-1])
                grads[name] = g.float().t() @ x
        self.inputs, self.output_grads = {}, {}
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
        spent = sum(ranks.get(l.name, 0) * l.cost for l in self.layers)
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
        with open(self.history_path, "a") as f:
            f.write(json.dumps({"step": step, "ranks": ranks}) + "\n")

    def grow(self, step: int, peft_model, optimizer, accelerator) -> dict[str, int]:
        """One growth event; returns the rank increments (identical in every process)."""
        from accelerate.utils import broadcast_object_list

        layers = lora_layers(peft_model)
        grads = self.capture.weight_gradients()
        self.capture = None
        ranks = {name: int(m.r[ADAPTER]) for name, m in layers.items()}
        spent = sum(ranks[l.name] * l.cost for l in self.layers)
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

