"""Sensitivity estimators against exact float64 references on small models."""

import math

import pytest
import torch
from torch import nn

from lorambo.budget import LayerSpec
from lorambo.sensitivity import (activation_covariances, data_weighted_approximation, gradient_sensitivity,
                                 hessian_operator_norm, hutchinson_trace, psd_sqrt, weighted_singular_values)



pytestmark = pytest.mark.usefixtures("float64")


def small_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    layers = [LayerSpec("0", 5, 4), LayerSpec("2", 3, 5)]
    loss_fn = lambda m, batch: nn.functional.cross_entropy(m(batch["x"]), batch["y"])
    return model, layers, [{"x": x, "y": y}], loss_fn


def exact_block_hessians(model, layers, batch, loss_fn):
    """The full Hessian block of each weight, by autograd.functional.hessian on the flattened weight."""
    blocks = {}
    for layer in layers:
        module = model.get_submodule(layer.name)
        w0 = module.weight.detach().clone()

        def loss_of(flat):
            params = {f"{layer.name}.weight": flat.reshape(w0.shape)}
            return loss_fn(lambda x: torch.func.functional_call(model, params, (x,)), batch)

        blocks[layer.name] = torch.autograd.functional.hessian(loss_of, w0.reshape(-1))
    return blocks


def test_hutchinson_matches_exact_trace_within_sampling_error():
    model, layers, batches, loss_fn = small_problem()
    exact = exact_block_hessians(model, layers, batches[0], loss_fn)
    probes = 4000
    estimate = hutchinson_trace(model, layers, batches, loss_fn, probes=probes, seed=1)
    for name, H in exact.items():
        # Rademacher probes: Var[v^T H v] = 2 (||H||_F^2 - sum_j H_jj^2)
        sd = math.sqrt(2 * (H.pow(2).sum() - H.diagonal().pow(2).sum()).item() / probes)
        assert abs(estimate[name] - H.trace().item()) < 4 * sd + 1e-12, (name, estimate[name], H.trace().item())


def test_power_iteration_matches_exact_operator_norm():
    model, layers, batches, loss_fn = small_problem(1)
    exact = exact_block_hessians(model, layers, batches[0], loss_fn)
    estimate = hessian_operator_norm(model, layers, batches, loss_fn, iterations=200)
    for name, H in exact.items():
        assert estimate[name] == pytest.approx(torch.linalg.eigvalsh(H).abs().max().item(), rel=1e-3)


def test_gradient_sensitivity_is_mean_squared_gradient_norm():
    model, layers, batches, loss_fn = small_problem(2)
    batches = batches * 2 + [{"x": torch.randn(8, 4), "y": torch.randint(0, 3, (8,))}]
    s, total = gradient_sensitivity(model, layers, batches, loss_fn)
    for layer in layers:
        grads = []
        for batch in batches:
            model.zero_grad()
            loss_fn(model, batch).backward()
            grads.append(model.get_submodule(layer.name).weight.grad.clone())
        assert s[layer.name] == pytest.approx(sum(g.pow(2).sum().item() for g in grads) / len(grads), rel=1e-10)
        assert torch.allclose(total[layer.name], sum(grads))
    s_only, no_sum = gradient_sensitivity(model, layers, batches, loss_fn, keep_sum=False)
    assert s_only == s and no_sum == {}


def test_activation_covariance_of_linear_and_conv_inputs():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    layers = [LayerSpec("0", 3, 2 * 9, "conv2d"), LayerSpec("2", 2, 48)]
    x = torch.randn(5, 2, 4, 4)
    G = activation_covariances(model, layers, [{"x": x}], lambda m, b: m(b["x"]))
    flat = model[1](model[0](x))
    assert torch.allclose(G["2"], flat.t() @ flat / 5)
    # conv: rows are the zero-padded 3x3 patches, one per output position
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    rows = torch.stack([padded[n, :, i:i + 3, j:j + 3].reshape(-1)
                        for n in range(5) for i in range(4) for j in range(4)])
    assert torch.allclose(G["0"], rows.t() @ rows / len(rows))


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_data_weighted_approximation_matches_weighted_least_squares(rank_deficient):
    """The closed form trunc_r(W G^1/2) G^+1/2 against a direct solution: alternating least squares on
    min_{A,B} ||(W - A B) G^{1/2}||_F^2, from many random starts."""
    torch.manual_seed(4)
    W = torch.randn(6, 5)
    L = torch.randn(5, 3 if rank_deficient else 5)
    G = L @ L.t() / L.shape[1]
    root = psd_sqrt(G)
    r = 2
    X = data_weighted_approximation(W, G, r)
    error = lambda M: ((W - M) @ root).pow(2).sum().item()
    assert torch.linalg.matrix_rank(X) <= r
    spectrum = torch.linalg.svdvals(W @ root)
    assert error(X) == pytest.approx(spectrum[r:].pow(2).sum().item(), rel=1e-9, abs=1e-12)

    best = math.inf
    for start in range(5):
        torch.manual_seed(10 + start)
        B = torch.randn(r, 5)
        for _ in range(300):
            # A-step: min_A ||(W - A B) S||, S = G^1/2: A = W S (B S)^+ ; B-step: min_B ||W S - A (B S)||
            A = W @ root @ torch.linalg.pinv(B @ root)
            B = torch.linalg.pinv(A) @ W @ root @ psd_sqrt(G, inverse=True)
        best = min(best, error(A @ B))
    assert error(X) <= best + 1e-8
    assert best == pytest.approx(error(X), rel=1e-6, abs=1e-10)


class SharedInput(nn.Module):
    """Three layers reading the same tensor (as query, key and value do) and one reading a fresh one."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 2)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(x)
        return self.out(self.q(h) * self.k(h)) + self.v(h)


def test_layers_sharing_an_input_get_that_inputs_covariance():
    torch.manual_seed(5)
    model = SharedInput()
    layers = [LayerSpec(n, 3 if n != "v" else 2, 4) for n in ("q", "k", "v")] + [LayerSpec("out", 2, 3)]
    batches = [{"x": torch.randn(7, 4)}, {"x": torch.randn(5, 4)}]
    G = activation_covariances(model, layers, batches, lambda m, b: m(b["x"]))
    h = torch.tanh(torch.cat([b["x"] for b in batches]))
    for name in ("q", "k", "v"):
        assert torch.allclose(G[name], h.t() @ h / 12)
    o = torch.cat([model.q(torch.tanh(b["x"])) * model.k(torch.tanh(b["x"])) for b in batches]).detach()
    assert torch.allclose(G["out"], o.t() @ o / 12)


@pytest.mark.parametrize("shape", [(3, 8), (8, 3), (5, 5)])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_weighted_singular_values_match_the_svd_of_w_g_half(shape, rank_deficient):
    torch.manual_seed(6)
    d_out, d_in = shape
    W = torch.randn(d_out, d_in)
    L = torch.randn(d_in, d_in - 2 if rank_deficient else d_in)
    G = L @ L.t() / L.shape[1]
    expected = torch.linalg.svdvals(W @ psd_sqrt(G)).numpy()
    got = weighted_singular_values(W, G)
    assert got.shape == expected.shape
    assert list(got) == sorted(got, reverse=True)
    # the W G W^T route: sigma^2 to ~eps relative to the largest, so sigma to ~sqrt(eps) x the largest
    assert abs(got - expected).max() <= 1e-7 * expected[0]
