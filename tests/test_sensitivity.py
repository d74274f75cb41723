"""Sensitivity estimators against exact float64 references on small models."""

import math

import pytest
import torch
from torch import nn

from lorambo.budget import LayerSpec
from lorambo.sensitivity import (activation_covariances, data_weighted_approximation, gradient_sensitivity,
                                 hessian_operator_norm, hutchinson_trace, psd_sqrt, sample_means,
                                 weighted_singular_values)



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


@pytest.mark.slow
def test_hutchinson_matches_exact_trace_within_sampling_error():
    model, layers, batches, loss_fn = small_problem()
    exact = exact_block_hessians(model, layers, batches[0], loss_fn)
    probes = 4000
    estimate = sample_means(hutchinson_trace(model, layers, batches, loss_fn, probes=probes, seed=1))
    for name, H in exact.items():
        # Rademacher probes: Var[v^T H v] = 2 (||H||_F^2 - sum_j H_jj^2)
        sd = math.sqrt(2 * (H.pow(2).sum() - H.diagonal().pow(2).sum()).item() / probes)
        assert abs(estimate[name] - H.trace().item()) < 4 * sd + 1e-12, (name, estimate[name], H.trace().item())


def test_power_iteration_matches_exact_operator_norm():
    model, layers, batches, loss_fn = small_problem(1)
    exact = exact_block_hessians(model, layers, batches[0], loss_fn)
    estimate = sample_means(hessian_operator_norm(model, layers, batches, loss_fn, iterations=200))
    for name, H in exact.items():
        assert estimate[name] == pytest.approx(torch.linalg.eigvalsh(H).abs().max().item(), rel=1e-3)


def test_gradient_sensitivity_is_mean_squared_gradient_norm():
    model, layers, batches, loss_fn = small_problem(2)
    batches = batches * 2 + [{"x": torch.randn(8, 4), "y": torch.randint(0, 3, (8,))}]
    samples, total = gradient_sensitivity(model, layers, batches, loss_fn)
    s = sample_means(samples)
    for layer in layers:
        grads = []
        for batch in batches:
            model.zero_grad()
            loss_fn(model, batch).backward()
            grads.append(model.get_submodule(layer.name).weight.grad.clone())
        assert s[layer.name] == pytest.approx(sum(g.pow(2).sum().item() for g in grads) / len(grads), rel=1e-10)
        assert torch.allclose(total[layer.name], sum(grads))
    s_only, no_sum = gradient_sensitivity(model, layers, batches, loss_fn, keep_sum=False)
    assert sample_means(s_only) == s and no_sum == {}


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


def test_covariance_rows_of_a_same_padded_convolution_are_the_patches_it_convolves():
    """timm's Conv2dSame pads inside forward: its rows, times its weight, must give its output exactly."""
    import lorambo  # noqa: F401  (the torchvision fix before timm)
    from timm.layers.conv2d_same import Conv2dSame

    from lorambo.sensitivity import layer_inputs_as_rows
    torch.manual_seed(3)
    conv = Conv2dSame(2, 3, 3, stride=2, bias=False).double()
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    rows = layer_inputs_as_rows(conv, x)
    out = conv(x)
    assert torch.allclose(rows @ conv.weight.reshape(3, -1).t(), out.permute(0, 2, 3, 1).reshape(-1, 3))
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 16, 2).double())
    G = activation_covariances(model, [LayerSpec("0", 3, 18, "conv2d")], [{"x": x}], lambda m, b: m(b["x"]))
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


def exact_fisher_trace(model, layers, batch, regression=False):
    """Tr(G_i) in float64 by enumeration: (1/N) sum_n sum_y p(y|x_n) ||grad_{W_i} log p(y|x_n)||^2 (for softmax
    cross-entropy the Fisher is the Gauss-Newton matrix); regression with loss (f - y)^2: (1/N) sum_n 2 ||J_n||^2."""
    x = batch["x"]
    traces = {l.name: 0.0 for l in layers}
    weights = [model.get_submodule(l.name).weight for l in layers]
    for n in range(len(x)):
        out = model(x[n:n + 1])[0]
        if regression:
            grads = torch.autograd.grad(out[0], weights)
            for l, g in zip(layers, grads):
                traces[l.name] += 2 * g.pow(2).sum().item() / len(x)
            continue
        logp = out.log_softmax(-1)
        for y in range(len(logp)):
            grads = torch.autograd.grad(logp[y], weights, retain_graph=True)
            for l, g in zip(layers, grads):
                traces[l.name] += logp[y].exp().item() * g.pow(2).sum().item() / len(x)
    return traces


def exact_ggn_trace(model, layers, batch):
    """Tr(J^T H_logits J) / N from full Jacobians: the Gauss-Newton trace, a second route to the same number."""
    x = batch["x"]
    traces = {}
    for layer in layers:
        module = model.get_submodule(layer.name)
        w0 = module.weight.detach().clone()
        total = 0.0
        for n in range(len(x)):
            f = lambda flat: torch.func.functional_call(model, {f"{layer.name}.weight": flat.reshape(w0.shape)},
                                                        (x[n:n + 1],))[0]
            J = torch.autograd.functional.jacobian(f, w0.reshape(-1))  # (classes, weights)
            p = f(w0.reshape(-1)).softmax(-1).detach()
            H = torch.diag(p) - torch.outer(p, p)
            total += torch.trace(J.t() @ H @ J).item()
        traces[layer.name] = total / len(x)
    return traces


def test_fisher_trace_matches_the_exact_gauss_newton_trace():
    from lorambo.sensitivity import fisher_trace

    model, layers, batches, _ = small_problem(4)
    output_fn = lambda m, b: (None, m(b["x"]))
    exact = exact_fisher_trace(model, layers, batches[0])
    ggn = exact_ggn_trace(model, layers, batches[0])
    samples = fisher_trace(model, layers, batches, output_fn, "classification", samples=3000, seed=2)
    for name in exact:
        assert exact[name] == pytest.approx(ggn[name], rel=1e-10)  # two routes, one number
        v = samples[name]
        assert (v >= 0).all()
        se = v.std(ddof=1) / math.sqrt(len(v))
        assert abs(v.mean() - exact[name]) < 4 * se, (name, v.mean(), exact[name], se)


def test_empirical_fisher_is_the_mean_squared_per_example_gradient():
    from lorambo.sensitivity import fisher_trace

    model, layers, batches, loss_fn = small_problem(5)
    batch = {"x": batches[0]["x"][:6], "labels": batches[0]["y"][:6]}
    output_fn = lambda m, b: (nn.functional.cross_entropy(m(b["x"]), b["labels"]), m(b["x"]))
    got = sample_means(fisher_trace(model, layers, [batch], output_fn, "classification", empirical=True))
    weights = [model.get_submodule(l.name).weight for l in layers]
    for i, layer in enumerate(layers):
        expected = 0.0
        for n in range(6):
            loss = nn.functional.cross_entropy(model(batch["x"][n:n + 1]), batch["labels"][n:n + 1])
            expected += torch.autograd.grad(loss, weights)[i].pow(2).sum().item() / 6
        assert got[layer.name] == pytest.approx(expected, rel=1e-10)


def test_fisher_trace_of_a_regression_head_matches_its_gauss_newton_trace():
    from lorambo.sensitivity import fisher_trace

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    layers = [LayerSpec("0", 5, 4), LayerSpec("2", 1, 5)]
    batch = {"x": torch.randn(12, 4)}
    exact = exact_fisher_trace(model, layers, batch, regression=True)
    samples = fisher_trace(model, layers, [batch], lambda m, b: (None, m(b["x"])), "classification",
                           samples=4000, seed=3)
    for name, v in samples.items():
        se = v.std(ddof=1) / math.sqrt(len(v))
        assert abs(v.mean() - exact[name]) < 4 * se, (name, v.mean(), exact[name], se)


def test_fisher_trace_of_a_language_model_counts_next_token_positions():
    """LM logits (batch, positions, vocab): position t predicts token t + 1, so the last position is not an
    output; the estimate against enumeration over the vocabulary at every other position."""
    from lorambo.sensitivity import fisher_trace

    torch.manual_seed(7)
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5)
    model = nn.ModuleDict({"emb": emb, "head": head})
    forward = lambda m, b: (None, m["head"](torch.tanh(m["emb"](b["input_ids"]))))
    batch = {"input_ids": torch.randint(0, 5, (3, 4))}
    layers = [LayerSpec("head", 5, 4)]
    logits = forward(model, batch)[1][:, :-1].reshape(-1, 5)
    exact = 0.0
    for row in logits:
        logp = row.log_softmax(-1)
        for y in range(5):
            (g,) = torch.autograd.grad(logp[y], head.weight, retain_graph=True)
            exact += logp[y].exp().item() * g.pow(2).sum().item() / len(logits)
    v = fisher_trace(model, layers, [batch], forward, "lm", samples=3000, seed=4)["head"]
    se = v.std(ddof=1) / math.sqrt(len(v))
    assert abs(v.mean() - exact) < 4 * se


def test_estimates_carry_standard_errors_and_non_positive_counts():
    from omegaconf import OmegaConf

    from lorambo.sensitivity import estimate

    model, layers, batches, loss_fn = small_problem(8)
    batches = batches * 3
    settings = OmegaConf.create({"gradient_batches": 3, "hessian_batches": 3, "hutchinson_probes": 2,
                                 "fisher_batches": 3, "fisher_samples": 2, "fisher_labels": "model",
                                 "power_iterations": 3, "covariance_batches": 1})
    output_fn = lambda m, b: (loss_fn(m, b), m(b["x"]))
    stats = estimate({"hessian_trace", "fisher_trace", "gradient"}, model, layers, batches, output_fn, settings,
                     seed=0)
    raw = hutchinson_trace(model, layers, batches, loss_fn, probes=2, seed=0)
    for name, v in raw.items():
        bars = stats["errors"]["hessian_trace"][name]
        assert bars["samples"] == 6 and bars["non_positive"] == int((v <= 0).sum())
        assert bars["standard_error"] == pytest.approx(v.std(ddof=1) / math.sqrt(6))
        assert stats["hessian_trace_raw"][name] == pytest.approx(v.mean())
        assert stats["hessian_trace"][name] > 0
    assert all(stats["errors"]["fisher_trace"][n]["non_positive"] == 0 for n in stats["fisher_trace"])

