"""EVA and GoRA: their statistics against float64 references, their allocations against brute force, their
starts against the formulas, and runs on every text family that count true parameters and reload in PEFT."""

import math

import numpy as np
import pytest
import torch

from lorambo.adapters import ADAPTER, factor_matrices, lora_layers, wrap_lora
from lorambo.allocation import estimation_batches
from lorambo.allocators import allocate, initialise_adapter
from lorambo.allocators.gora import gradient_step_B
from lorambo.allocators.uniform import uniform_rank
from lorambo.budget import LayerSpec, allocation_cost
from lorambo.data import load_task
from lorambo.evaluation import loss_and_logits
from lorambo.models import adaptable_layers, build_model, build_tokenizer
from lorambo.sensitivity import estimate
from tests.helpers import compose_cfg, run_in_process


def test_gradient_step_B_is_the_projected_descent_step_in_float64():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    G = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    scale, step = 0.5, 0.01
    B = gradient_step_B(A, G, scale, step)
    Q, _ = torch.linalg.qr(A.T)  # an orthonormal basis of A's row space, by a second method
    expected = -step * math.sqrt(7 / 3) * G @ Q @ Q.T
    torch.testing.assert_close(scale * B @ A, expected, rtol=1e-10, atol=1e-12)


def layers_of(costs: list[tuple[int, int]]) -> list[LayerSpec]:
    return [LayerSpec(f"l{i}", d_out, d_in) for i, (d_out, d_in) in enumerate(costs)]


def test_eva_takes_the_top_ratios_when_every_layer_costs_the_same():
    """Equal costs: a parameter budget is a rank budget, and EVA is PEFT's rule, the top K ratios overall."""
    rng = np.random.default_rng(0)
    layers = layers_of([(16, 16)] * 4)
    ratios = {l.name: np.sort(rng.dirichlet(np.ones(16)))[::-1][:8] for l in layers}
    for k in (4, 9, 20):
        ranks = allocate("eva", layers, k * 32, {"explained_variance": ratios})
        top = sorted(((v, name) for name, vs in ratios.items() for v in vs), reverse=True)[:k]
        expected = {name: sum(1 for _, n in top if n == name) for name in ratios}
        assert ranks == {n: r for n, r in expected.items() if r > 0}


def test_eva_pays_true_costs_and_fills_the_budget_greedily():
    layers = layers_of([(64, 64), (8, 8)])
    ratios = {"l0": np.array([0.5, 0.4, 0.3]), "l1": np.array([0.45, 0.2, 0.1])}
    # 310 parameters: l0's first (128), l1's first (16), l0's second (128): 272; l0's third no longer fits,
    # l1's second and third do (16 each: 304)
    assert allocate("eva", layers, 310, {"explained_variance": ratios}) == {"l0": 2, "l1": 3}
    assert allocate("eva", layers, 300, {"explained_variance": ratios}) == {"l0": 2, "l1": 2}


def test_gora_shares_the_budget_in_proportion_to_importance_and_spends_it():
    layers = layers_of([(10, 10)] * 3)
    ranks = allocate("gora", layers, 20 * 12, {"gradient_saliency": {"l0": 6.0, "l1": 3.0, "l2": 3.0}},
                     max_rank_factor=10)
    assert ranks == {"l0": 6, "l1": 3, "l2": 3}
    # unequal costs and fractional targets: within P_max, within one cheapest rank of it, each rank within one
    # of its target P_max I_i / sum I / c_i
    layers = layers_of([(24, 8), (16, 16), (40, 20)])
    importance = {"l0": 1.0, "l1": 2.5, "l2": 4.0}
    p_max = 800
    ranks = allocate("gora", layers, p_max, {"gradient_saliency": importance}, max_rank_factor=100)
    cost = allocation_cost(ranks, layers)
    assert p_max - min(l.cost for l in layers) < cost <= p_max
    target = {l.name: p_max * importance[l.name] / sum(importance.values()) / l.cost for l in layers}
    assert all(abs(ranks[n] - target[n]) < 1.5 for n in target)


def test_gora_keeps_min_and_max_ranks():
    layers = layers_of([(10, 10)] * 3)
    r_u = uniform_rank(layers, 3 * 20 * 4)
    ranks = allocate("gora", layers, 3 * 20 * 4, {"gradient_saliency": {"l0": 100.0, "l1": 1e-6, "l2": 1e-6}},
                     min_rank=2, max_rank_factor=1.5)
    assert ranks["l1"] >= 2 and ranks["l2"] >= 2 and ranks["l0"] <= round(1.5 * r_u)


@pytest.fixture(scope="module")
def tiny_bert_statistics():
    cfg = compose_cfg(["experiment=smoke", "sensitivity.gradient_batches=2", "sensitivity.covariance_batches=2"])
    torch.manual_seed(0)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, cfg.task, tokenizer)
    layers = adaptable_layers(model, cfg.model.target_modules)
    data = load_task(cfg.task, cfg.model, tokenizer)
    batches = estimation_batches(data, cfg, "cpu")[:2]
    output_fn = lambda m, b: loss_and_logits(m, b, cfg.task.type)
    stats = estimate({"explained_variance", "gradient_saliency", "mean_gradient"}, model, layers, batches,
                     output_fn, cfg.sensitivity, rank=3)  # EVA's r; rho 2: 6 directions per layer
    return cfg, model, layers, batches, stats


class InputsThroughOneLayer(torch.nn.Module):
    def __init__(self, d_in: int = 12):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, 5)

    def forward(self, input_ids, attention_mask):  # here the "ids" are the features themselves
        return self.proj(input_ids)


def test_explained_variance_is_the_pca_of_the_layer_inputs_in_float64():
    """PEFT's incremental, low-rank PCA against an exact eigendecomposition of the input covariance (padding left
    out, centred, float64), on inputs with a decaying spectrum (a random tiny BERT's is nearly flat, where any
    low-rank PCA blurs neighbours: docs/results.md has both, and the real MiniLM's)."""
    from omegaconf import OmegaConf

    gen = torch.Generator().manual_seed(0)
    spectrum = 2.0 ** -torch.arange(12.0)
    batches = []
    for _ in range(4):
        mask = torch.ones(6, 20, dtype=torch.long)
        mask[:, 15:] = 0  # padding: left out
        features = torch.randn(6, 20, 12, generator=gen) * spectrum + 3.0
        features[mask == 0] = 100.0  # would dominate the spectrum if it were counted
        batches.append({"input_ids": features, "attention_mask": mask})
    model = InputsThroughOneLayer()
    settings = OmegaConf.create({"eva_rho": 2.0, "eva_tau": 0.999, "eva_max_batches": 200})
    stats = estimate({"explained_variance"}, model, [LayerSpec("proj", 5, 12)], batches, None, settings,
                     rank=2)  # rho 2: 4 directions
    X = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches]).double()
    X = X - X.mean(0)
    eig = torch.linalg.eigvalsh(X.T @ X).flip(0)
    np.testing.assert_allclose(stats["explained_variance"]["proj"], (eig / eig.sum())[:4].numpy(), rtol=0.01)
    components = stats["input_components"]["proj"].double()
    torch.testing.assert_close(components @ components.T, torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_gradient_saliency_is_mean_abs_weight_times_mean_gradient(tiny_bert_statistics):
    cfg, model, layers, batches, stats = tiny_bert_statistics
    weights = [model.get_submodule(l.name).weight for l in layers]
    grads = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    model.eval()  # as the estimate is taken: no dropout
    for batch in batches:  # the reference: plain backward with every parameter trainable, float64 sums
        model.zero_grad()
        loss_and_logits(model, batch, cfg.task.type)[0].backward()
        for g, w in zip(grads, weights):
            g += w.grad.double()
    for layer, w, g in zip(layers, weights, grads):
        expected = float((w.detach().double() * g / len(batches)).abs().mean())
        assert stats["gradient_saliency"][layer.name] == pytest.approx(expected, rel=1e-5)


def test_eva_and_gora_start_their_adapters_as_their_papers_say(tiny_bert_statistics):
    cfg, model, layers, _, stats = tiny_bert_statistics
    p_max = 4 * sum(l.cost for l in layers)
    for name in ("eva", "gora"):
        ranks = allocate(name, layers, p_max, stats)
        peft_model = wrap_lora(model, ranks, cfg.model.head_modules, cfg.lora, False, uniform_rank(layers, p_max))
        assert initialise_adapter(name, peft_model, stats, {"init_step": 0.01})
        for layer_name, layer in lora_layers(peft_model).items():
            A, B = factor_matrices(layer)
            if name == "eva":  # A: the input's leading directions, B zero (the model starts as the base)
                torch.testing.assert_close(A, stats["input_components"][layer_name][: ranks[layer_name]].float())
                assert not B.any()
            else:  # B: the gradient step projected on A's random rows
                G = stats["mean_gradient"][layer_name].double()
                Q, _ = torch.linalg.qr(A.detach().double().T)
                expected = -0.01 * math.sqrt(A.shape[1] / A.shape[0]) * G @ Q @ Q.T
                torch.testing.assert_close(layer.scaling[ADAPTER] * (B @ A).double(), expected, rtol=1e-4,
                                           atol=1e-9)
        model = peft_model.unload()


def allocate_cli(args, tmp_path, monkeypatch, capfd):
    from tests.helpers import run_main

    return run_main(args, tmp_path, monkeypatch, capfd, program="lorambo-allocate")


@pytest.mark.parametrize("allocator,scaling", [("hessian_offline", "matched"), ("eva", "matched"),
                                               ("gora", "per_layer")])
@pytest.mark.slow
def test_allocate_writes_a_peft_config_that_gives_every_layer_its_rank_and_scale(allocator, scaling, tmp_path,
                                                                                monkeypatch, capfd):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lorambo.adapters import adapter_ranks, effective_scalings

    out = tmp_path / "allocation"
    code, stdout, err = allocate_cli(["experiment=smoke", f"allocator={allocator}", f"lora.scaling={scaling}",
                                      f"hydra.run.dir={out}"], tmp_path, monkeypatch, capfd)
    assert code == 0, err[-2000:]
    allocation = json.loads((out / "allocation.json").read_text())
    assert not (out / "metrics.json").exists()  # nothing was trained
    config = LoraConfig.from_pretrained(str(out))
    base = AutoModelForSequenceClassification.from_pretrained(str(out / "base_model"))
    layers = adaptable_layers(base, compose_cfg(["experiment=smoke"]).model.target_modules)
    peft_model = get_peft_model(base, config)
    ranks = allocation["ranks"]
    assert adapter_ranks(peft_model) == ranks
    assert allocation["adapter_params"] == allocation_cost(ranks, layers) <= allocation["p_max"]
    alpha, r_u = 16.0, uniform_rank(layers, allocation["p_max"])  # lora.alpha's default
    expected = {n: alpha / r_u if scaling == "matched" else alpha / r for n, r in ranks.items()}
    assert effective_scalings(peft_model) == pytest.approx(expected, rel=1e-12)
    # the same allocation a training run starts from
    run = run_in_process(["experiment=smoke", f"allocator={allocator}", f"lora.scaling={scaling}",
                          "train.max_steps=1"], tmp_path / "run")
    assert run["ranks"] == ranks
    if allocator == "eva":  # PEFT's own EVA start keeps every layer's rank (rho 1) and scale
        from peft import initialize_lora_eva_weights

        cfg = compose_cfg(["experiment=smoke"])
        data = load_task(cfg.task, cfg.model, build_tokenizer(cfg.model))
        initialize_lora_eva_weights(peft_model, estimation_batches(data, cfg, "cpu"), show_progress_bar=False)
        assert adapter_ranks(peft_model) == ranks
        assert effective_scalings(peft_model) == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_allocate_refuses_a_method_whose_ranks_change_while_it_trains(tmp_path, monkeypatch, capfd):
    code, _, err = allocate_cli(["experiment=smoke", "allocator=hessian_online", f"hydra.run.dir={tmp_path / 'a'}"],
                                tmp_path, monkeypatch, capfd)
    assert code != 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lorambo-allocate: error:")]
    assert len(errors) == 1 and "sets its ranks while it trains" in errors[0]
    assert not (tmp_path / "a" / "adapter_config.json").exists()


def test_eva_waits_only_for_the_directions_peft_would_use_not_a_degenerate_tail():
    """Regression: lorambo asked PEFT for all rho x r directions as if each were needed, so PEFT waited for
    directions of equal variance (which PEFT's low-rank SVD never settles) and the tuned sweep's EVA runs on
    MiniLM stopped at sensitivity.eva_max_batches (here: at 60 batches on the old code). PEFT's own rule waits
    for the directions its rank distribution uses."""
    from omegaconf import OmegaConf

    gen = torch.Generator().manual_seed(1)
    spectrum = torch.tensor([4.0, 2.0] + [0.5] * 46)  # a flat tail after two clear directions
    batches = [{"input_ids": torch.randn(6, 20, 48, generator=gen) * spectrum,
                "attention_mask": torch.ones(6, 20, dtype=torch.long)} for _ in range(4)]
    settings = OmegaConf.create({"eva_rho": 6.0, "eva_tau": 0.99, "eva_max_batches": 60})
    stats = estimate({"explained_variance"}, InputsThroughOneLayer(48), [LayerSpec("proj", 5, 48)], batches, None, settings,
                     rank=2)  # 12 directions computed, 2 used by PEFT's own distribution
    assert len(stats["explained_variance"]["proj"]) == 12
    directions = stats["input_components"]["proj"].double()
    # the two clear directions are found (the inputs' axes 0 and 1); the tail's are any orthonormal rest
    assert abs(directions[0, 0]) > 0.99 and abs(directions[1, 1]) > 0.98
    torch.testing.assert_close(directions @ directions.T, torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)


def test_adalora_target_rank_is_the_uniform_rank_nearest_the_budget():
    """Brute force over candidate target ranks on random layer shapes; and at LoRA r's budget, r itself (the
    old floor mapping gave r - 1 there, the singular values tipping the cost over)."""
    from lorambo.methods.adalora import adalora_target_rank

    rng = np.random.default_rng(0)
    for _ in range(200):
        layers = [LayerSpec(f"l{i}", int(rng.integers(1, 64)), int(rng.integers(1, 64)))
                  for i in range(int(rng.integers(1, 8)))]
        per_rank = sum(layer.cost + 1 for layer in layers)
        p_max = int(rng.integers(per_rank, 20 * per_rank))
        chosen = adalora_target_rank(layers, p_max)
        assert all(abs(chosen * per_rank - p_max) <= abs(r * per_rank - p_max) for r in range(1, 25))
    layers = [LayerSpec("q", 384, 384), LayerSpec("fc1", 1536, 384), LayerSpec("fc2", 384, 1536)]
    for r in (1, 2, 4, 8):
        assert adalora_target_rank(layers, r * sum(layer.cost for layer in layers)) == r
