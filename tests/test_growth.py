"""Online growth of real LoRA tensors: function unchanged, optimizer state carried, budget kept, and the same
decision in every process."""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import lorambo  # noqa: F401
from lorambo.adapters import adapter_ranks, factor_matrices, grow_rank, lora_layers, sync_peft_config, wrap_lora
from lorambo.methods.growth import GradientCapture, residual, singular_values_and_right_vectors
from tests.helpers import LORA, Tiny, free_port, run_in_process


def trained_tiny(steps=5, rslora=False):
    torch.manual_seed(0)
    cfg = OmegaConf.merge(LORA, {"scaling": "rslora" if rslora else "per_layer"})
    model = wrap_lora(Tiny(), {"conv": 2, "fc1": 3, "fc2": 1}, [], cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, x, y


@pytest.mark.parametrize("rslora", [False, True])
def test_growth_keeps_the_function_and_the_optimizer_state(rslora):
    model, optimizer, x, y = trained_tiny(rslora=rslora)
    model.eval()
    before = model(x).detach()
    layers = lora_layers(model)
    old_state = {name: {k: v.clone() for k, v in optimizer.state[m.lora_A["default"].weight].items()}
                 for name, m in layers.items()}
    old_scaling = {name: m.scaling["default"] for name, m in layers.items()}
    for name, layer in layers.items():
        A, _ = factor_matrices(layer)
        grow_rank(layer, torch.randn(2, A.shape[1]), optimizer)
    assert adapter_ranks(model) == {"conv": 4, "fc1": 5, "fc2": 3}
    assert torch.allclose(model(x), before, atol=1e-6)  # new B columns are zero: same function
    for name, layer in layers.items():
        assert layer.scaling["default"] == old_scaling[name]
        state = optimizer.state[layer.lora_A["default"].weight]
        r = old_state[name]["exp_avg"].shape[0]
        assert torch.equal(state["exp_avg"][:r], old_state[name]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"][:r], old_state[name]["exp_avg_sq"])
        assert state["exp_avg"][r:].abs().sum() == 0 and state["exp_avg_sq"][r:].abs().sum() == 0
        assert torch.equal(state["step"], old_state[name]["step"])
        # the optimizer trains the new tensors, not the old ones
        assert any(p is layer.lora_B["default"].weight for g in optimizer.param_groups for p in g["params"])

    model.train()
    losses = []
    for _ in range(5):  # training continues, and reaches the new components
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for layer in layers.values():
        _, B = factor_matrices(layer)
        assert B[:, -2:].abs().sum() > 0


def test_grown_adapter_saves_and_reloads_with_the_same_function(tmp_path):
    from peft import PeftModel

    model, optimizer, x, _ = trained_tiny()
    for layer in lora_layers(model).values():
        A, _ = factor_matrices(layer)
        grow_rank(layer, torch.randn(3, A.shape[1]), optimizer)
    for _ in range(3):  # make the new components matter
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = model(x).detach()
    sync_peft_config(model)
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(Tiny(), str(tmp_path / "adapter")).eval()
    assert adapter_ranks(reloaded) == adapter_ranks(model)
    assert torch.allclose(reloaded(x), expected, atol=1e-6)


def base_weight_gradient(model, layer, x, y) -> torch.Tensor:
    """The reference: autograd on the adapted layer's base weight itself, as (out, in) for a convolution too."""
    base = layer.get_base_layer()
    model.zero_grad()
    base.weight.requires_grad_(True)
    nn.functional.cross_entropy(model(x), y).backward()
    base.weight.requires_grad_(False)
    return base.weight.grad.reshape(base.weight.shape[0], -1)


def test_captured_gradient_is_the_full_weight_gradient():
    model, _, x, y = trained_tiny()
    layers = lora_layers(model)
    with GradientCapture(layers) as capture:
        nn.functional.cross_entropy(model(x), y).backward()
    grads = capture.weight_gradients()
    for name, layer in layers.items():
        assert torch.allclose(grads[name], base_weight_gradient(model, layer, x, y), atol=1e-5), name


class SameStem(nn.Module):
    """timm's TensorFlow-"SAME" stride-2 stem (EfficientNet-Lite0's conv_stem), which pads inside its forward, on an
    odd-sized image so its padding is uneven."""

    def __init__(self):
        super().__init__()
        from timm.layers.conv2d_same import Conv2dSame
        self.stem = Conv2dSame(2, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.stem(x)).flatten(1))


def test_captured_gradient_of_a_same_padded_convolution_is_its_weight_gradient():
    torch.manual_seed(0)
    model = wrap_lora(SameStem(), {"stem": 2, "fc": 1}, [], LORA)
    x, y = torch.randn(5, 2, 7, 7), torch.randint(0, 3, (5,))
    layers = lora_layers(model)
    with GradientCapture(layers) as capture:
        nn.functional.cross_entropy(model(x), y).backward()
    grads = capture.weight_gradients()
    assert torch.allclose(grads["stem"], base_weight_gradient(model, layers["stem"], x, y), atol=1e-6)


class SharedLayer(nn.Module):
    """fc1 runs twice per forward, on the input and on a second tensor (as DeBERTa's key_proj runs on the tokens
    and on its relative-position embeddings)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 3)
        self.positions = nn.Parameter(torch.randn(5, 6), requires_grad=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)) + torch.tanh(self.fc1(self.positions)).mean(0))


def test_captured_gradient_sums_every_call_of_a_layer():
    torch.manual_seed(0)
    model = wrap_lora(SharedLayer(), {"fc1": 2, "fc2": 1}, [], LORA)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    layers = lora_layers(model)
    with GradientCapture(layers) as capture:
        nn.functional.cross_entropy(model(x), y).backward()
    grads = capture.weight_gradients()
    # the last call alone differs
    assert torch.allclose(grads["fc1"], base_weight_gradient(model, layers["fc1"], x, y), atol=1e-6)


def test_residual_is_orthogonal_to_the_adapter_subspaces():
    torch.manual_seed(1)
    G, A, B = torch.randn(7, 9, dtype=torch.float64), torch.randn(2, 9), torch.randn(7, 2)
    R = residual(G, A, B)
    assert torch.allclose(R @ A.double().t(), torch.zeros(7, 2, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(B.double().t() @ R, torch.zeros(2, 9, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(residual(G, A, torch.zeros(7, 2)) @ A.double().t(), torch.zeros(7, 2, dtype=torch.float64),
                          atol=1e-10)


@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (12, 12)])
def test_gram_route_matches_the_svd(shape):
    """The growth event's singular values and right vectors against torch.linalg.svd, on a residual with
    the adapter's subspaces projected out (so some singular values are exactly zero)."""
    torch.manual_seed(2)
    d_out, d_in = shape
    R = residual(torch.randn(d_out, d_in, dtype=torch.float64), torch.randn(2, d_in), torch.randn(d_out, 2))
    S, Vh = singular_values_and_right_vectors(R)
    _, S_ref, Vh_ref = torch.linalg.svd(R, full_matrices=False)
    assert S.shape == S_ref.shape and Vh.shape == Vh_ref.shape
    assert torch.allclose(S, S_ref, atol=1e-7 * float(S_ref[0]))
    significant = int((S_ref > 1e-6 * S_ref[0]).sum())
    assert significant == min(shape) - 2
    # each significant right singular vector, up to sign (the values are distinct for a random matrix)
    agreement = (Vh[:significant] * Vh_ref[:significant]).sum(1).abs()
    assert torch.allclose(agreement, torch.ones(significant, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(Vh.norm(dim=1), torch.ones(len(Vh), dtype=torch.float64))


@pytest.mark.slow
def test_online_run_grows_within_budget_and_logs_history(tmp_path):
    metrics = run_in_process(["experiment=smoke", "allocator=hessian_online", "method.grow_every=4",
                              "method.growth_events=3"], tmp_path / "online")
    history = [json.loads(line) for line in (tmp_path / "online" / "rank_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history][:4] == [0, 4, 8, 12]
    assert all(r == 1 for r in history[0]["ranks"].values())
    assert sum(history[-1]["ranks"].values()) > sum(history[0]["ranks"].values())  # it grew
    assert metrics["adapter_params"] <= metrics["p_max"]
    assert history[-1]["ranks"] == metrics["ranks"]
    assert (tmp_path / "online" / "rank_history.png").stat().st_size > 0


def _growth_process(rank, port, out_dir):
    """One of two processes of a gloo group, forked from this one (its imports done): the environment torchrun
    gives each process, then the worker script's main."""
    from accelerate.state import AcceleratorState, GradientState

    from tests import distributed_growth_worker

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
    AcceleratorState._reset_state(reset_partial_state=True)  # the parent's single-process state, inherited
    GradientState._reset_state()
    distributed_growth_worker.main(out_dir)


@pytest.mark.slow
def test_two_processes_take_identical_growth_decisions(tmp_path):
    """Two CPU processes on gloo, each measuring on different data: same ranks, same new tensors. Forked, not
    started by torchrun (a fresh interpreter each, 10 s of imports on a core); tests/test_scale.py runs torchrun."""
    import multiprocessing

    fork, port = multiprocessing.get_context("fork"), free_port()
    processes = [fork.Process(target=_growth_process, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    assert [p.exitcode for p in processes] == [0, 0]
    outcomes = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert outcomes[0]["data_differs"]
    assert outcomes[0]["ranks"] == outcomes[1]["ranks"] and outcomes[0]["increments"]
    for name in outcomes[0]["A"]:
        assert torch.equal(outcomes[0]["A"][name], outcomes[1]["A"][name])


def grow_tiny(p_max, traces, events, tmp_path, total_steps=8):
    """A Tiny LoRA model at rank 1 grown by `events` events, each measured on its own step."""
    from accelerate import Accelerator

    from lorambo.budget import LayerSpec
    from lorambo.methods.growth import OnlineGrowth

    torch.manual_seed(0)
    model = wrap_lora(Tiny(), {"conv": 1, "fc1": 1, "fc2": 1}, [], LORA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    specs = [LayerSpec("conv", 4, 18, "conv2d"), LayerSpec("fc1", 16, 64), LayerSpec("fc2", 3, 16)]
    growth = OnlineGrowth(specs, p_max, traces, OmegaConf.create({"growth_events": events, "grow_every": None}),
                          str(tmp_path), total_steps)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    accelerator = Accelerator(cpu=True)
    for step in range(1, total_steps + 1):
        if growth.due(step):
            with growth.measuring(model):
                nn.functional.cross_entropy(model(x), y).backward()
            growth.grow(step, model, optimizer, accelerator)
            optimizer.zero_grad()
    return growth, adapter_ranks(model), specs


def test_a_layer_with_no_usable_curvature_is_the_last_to_grow(tmp_path):
    """Regression: the benefit sigma^2 / 2h took h from the floored trace, so a layer whose Hutchinson estimate
    came out <= 0 got a tiny h and a huge benefit: it was grown first. Now it gets the largest usable h."""
    growth, ranks, specs = grow_tiny(121 + 80, {"conv": 1.0, "fc1": -3.0, "fc2": 1.0}, 1, tmp_path)
    h = growth.curvature
    assert growth.no_curvature == ["fc1"]
    assert h["fc1"] == max(h["conv"], h["fc2"]) > 0
    from lorambo.allocators.hessian_online import marginal_benefits
    with pytest.raises(AssertionError):
        marginal_benefits([1.0], 0.0)  # a non-positive curvature never reaches the division


def test_growth_carries_a_share_too_small_for_any_layer_to_the_next_event(tmp_path):
    """Regression: with 70 parameters left over 4 events, the first share (17) is below the cheapest layer's
    cost (19): nothing was granted and growth ended with the budget unspent. Now the share carries forward and
    the budget is spent to within one rank of the costliest layer."""
    p_max = 121 + 70  # rank 1 everywhere costs 22 + 80 + 19
    growth, ranks, specs = grow_tiny(p_max, {"conv": 1.0, "fc1": 1.0, "fc2": 1.0}, 4, tmp_path)
    spent = sum(ranks[s.name] * s.cost for s in specs)
    assert growth.events_held == 4 and growth.stopped is None
    assert spent <= p_max and p_max - spent < max(s.cost for s in specs)
    assert spent > 121


def test_growth_events_spread_over_the_first_half_of_a_short_run():
    """Regression: a fixed grow_every=50 never fired in a 16-step run; by default the events now follow the run's
    length, and an explicit grow_every still wins."""
    from lorambo.allocators.hessian_online import event_steps

    assert event_steps(16, 4, None) == [2, 4, 6, 8]
    assert event_steps(528, 4, None) == [66, 132, 198, 264]
    assert event_steps(3, 4, None) == [1]  # fewer steps than events: what fits
    assert event_steps(16, 4, 50) == [50, 100, 150, 200]


@pytest.mark.slow
def test_smoke_run_of_hessian_online_spends_its_budget(tmp_path):
    """Regression: `experiment=smoke allocator=hessian_online` ended at rank 1 everywhere (896 of 7,168 spent)
    and said nothing."""
    metrics = run_in_process(["experiment=smoke", "allocator=hessian_online"], tmp_path / "run")
    assert metrics["growth_events"] >= 1
    history = [json.loads(line) for line in (tmp_path / "run" / "rank_history.jsonl").read_text().splitlines()]
    assert len(history) >= 3
    assert metrics["adapter_params"] <= metrics["p_max"]
    assert metrics["growth_unspent_params"] == metrics["p_max"] - metrics["adapter_params"]
    assert "warning" not in metrics
    assert metrics["growth_unspent_params"] < max_layer_cost(tmp_path / "run")


def max_layer_cost(run_dir):
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    costs = {}
    for name, t in tensors.items():
        if "lora_A" in name:
            costs[name.split(".lora_A")[0]] = costs.get(name.split(".lora_A")[0], 0) + t.shape[1]
        elif "lora_B" in name:
            costs[name.split(".lora_B")[0]] = costs.get(name.split(".lora_B")[0], 0) + t.shape[0]
    return max(costs.values())


@pytest.mark.slow
def test_a_run_that_ends_before_its_growth_events_warns_and_says_so(tmp_path):
    metrics = run_in_process(["experiment=smoke", "allocator=hessian_online", "method.grow_every=100"],
                             tmp_path / "run")
    assert metrics["growth_events"] == 0 and metrics["growth_unspent_params"] > 0
    assert "warning" in metrics and "grow_every" in metrics["warning"]
    log = (tmp_path / "run" / "metrics_log.jsonl").read_text()
    assert "warning" in log
