"""Per-layer statistics the allocators need, measured on the base model before the adapter exists.

Every estimator works on the adaptable weights W_i only (the rest of the model stays frozen, so autograd
does no work for it) and takes a `loss_fn(model, batch) -> loss`.
"""

import weakref
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorambo.budget import LayerSpec


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as the (d_out, d_in) matrix LoRA adapts: Conv1D is stored (in, out); Conv2d flattens its kernel."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight.reshape(module.weight.shape[0], -1)


@contextmanager
def only_weights_require_grad(model: nn.Module, layers: list[LayerSpec]):
    """Gradients for the adaptable weights alone; every requires_grad flag is restored afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    weights = [model.get_submodule(l.name).weight for l in layers]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield weights
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


@contextmanager
def twice_differentiable():
    """Fused attention kernels have no double backward; the math kernel does (same function)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def to_matrix_grad(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    from transformers.pytorch_utils import Conv1D

    return grad.t() if isinstance(module, Conv1D) else grad.reshape(grad.shape[0], -1)


def gradient_sensitivity(model, layers, batches, loss_fn, keep_sum: bool = True
                         ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """s_i = mean_t ||grad_{W_i} L_t||_F^2, and (if keep_sum) the summed gradient, an early estimate of the
    update; squared norms stay on the device until the end (no host sync per layer and batch)."""
    sq = 0
    total = {}
    with only_weights_require_grad(model, layers) as weights:
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), weights)
            sq = sq + torch.stack([g.pow(2).sum(dtype=torch.float64) for g in grads])
            if keep_sum:
                for layer, g in zip(layers, grads):
                    g = to_matrix_grad(model.get_submodule(layer.name), g.detach())
                    total[layer.name] = total[layer.name] + g if layer.name in total else g.clone()
    return {l.name: v / len(batches) for l, v in zip(layers, sq.cpu().tolist())}, total


def hutchinson_trace(model, layers, batches, loss_fn, probes: int = 1, seed: int = 0) -> dict[str, float]:
    """Tr(H_i) for every block at once: one Rademacher probe v over all W_i and one Hessian-vector product give
    v_i . (Hv)_i for every i; averaged over `probes` per batch and over batches."""
    generator = torch.Generator().manual_seed(seed)
    estimates = {l.name: 0.0 for l in layers}
    n = 0
    with only_weights_require_grad(model, layers) as weights, twice_differentiable():
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), weights, create_graph=True)
            for k in range(probes):
                vs = [(torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w) for w in weights]
                hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=k < probes - 1)
                for layer, v, hv in zip(layers, vs, hvs):
                    estimates[layer.name] += float((v.double() * hv.double()).sum())
                n += 1
    return {name: v / n for name, v in estimates.items()}


def hessian_operator_norm(model, layers, batches, loss_fn, iterations: int = 10, seed: int = 0) -> dict[str, float]:
    """||H_i||_op per block by power iteration on Hessian-vector products restricted to block i (one batch's
    Hessian per batch, averaged over batches)."""
    generator = torch.Generator().manual_seed(seed)
    norms = {l.name: 0.0 for l in layers}
    with only_weights_require_grad(model, layers) as weights, twice_differentiable():
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), weights, create_graph=True)
            for i, (layer, w, g) in enumerate(zip(layers, weights, grads)):
                v = torch.randn(w.shape, generator=generator).to(w)
                v /= v.norm()
                value = 0.0
                for _ in range(iterations):
                    (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True)
                    value = float((v * hv).sum())
                    v = hv / hv.norm().clamp_min(1e-30)
                norms[layer.name] += abs(value) / len(batches)
    return norms


def layer_inputs_as_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of length d_in: tokens for Linear/Conv1D, unfolded patches for Conv2d."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def activation_covariances(model, layers, batches, forward_fn) -> dict[str, torch.Tensor]:
    """G_i = E[x x^T] over the layer's input rows (float64), from forward passes over `batches`. Layers fed the
    same tensor (query, key and value) share one x^T x per batch instead of computing it once each."""
    sums, counts, handles = {}, {}, []
    this_batch = {}  # (id(input), unfold geometry) -> (weak reference to the input, x^T x, rows)

    def hook(name, module):
        geometry = ((module.kernel_size, module.dilation, module.padding, module.stride)
                    if isinstance(module, nn.Conv2d) else None)

        def capture(_, inputs):
            x = inputs[0]
            key = (id(x), geometry)
            cached = this_batch.get(key)
            if cached is None or cached[0]() is not x:  # an id is only reused once its tensor is gone
                rows = layer_inputs_as_rows(module, x).double()
                cached = (weakref.ref(x), rows.t() @ rows, rows.shape[0])
                this_batch[key] = cached
            sums[name] = sums.get(name, 0) + cached[1]
            counts[name] = counts.get(name, 0) + cached[2]
        return capture

    for layer in layers:
        module = model.get_submodule(layer.name)
        handles.append(module.register_forward_pre_hook(hook(layer.name, module)))
    try:
        for batch in batches:
            forward_fn(model, batch)
            this_batch.clear()
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums}


def psd_sqrt(G: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """G^{1/2} (or the pseudo-inverse G^{+1/2}) of a symmetric PSD matrix."""
    eigenvalues, vectors = torch.linalg.eigh(G)
    eigenvalues = eigenvalues.clamp_min(0)
    root = eigenvalues.sqrt()
    if inverse:
        cutoff = eigenvalues.max() * G.shape[0] * torch.finfo(G.dtype).eps
        root = torch.where(eigenvalues > cutoff, 1 / root, torch.zeros_like(root))
    return (vectors * root) @ vectors.t()


def data_weighted_approximation(W: torch.Tensor, G: torch.Tensor, r: int) -> torch.Tensor:
    """argmin_{rank X <= r} ||(W - X) G^{1/2}||_F^2 = trunc_r(W G^{1/2}) G^{+1/2}."""
    U, S, Vh = torch.linalg.svd(W @ psd_sqrt(G), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r] @ psd_sqrt(G, inverse=True)


def weighted_singular_values(W: torch.Tensor, G: torch.Tensor) -> np.ndarray:
    """Singular values of W G^{1/2} (W: d_out x d_in), descending. For a wide W (d_out < d_in) they are the
    square roots of the eigenvalues of W G W^T, a d_out x d_out matrix: G's square root, the costly part for
    wide inputs, is never formed (accurate to about sqrt(eps) x the largest, far below what allocation uses)."""
    W = W.double()
    if W.shape[0] < W.shape[1]:
        M = W @ G @ W.t()
        eigenvalues = torch.linalg.eigvalsh((M + M.t()) / 2).clamp_min(0)
        return eigenvalues.sqrt().flip(0).numpy()
    return torch.linalg.svdvals(W @ psd_sqrt(G)).numpy()


def weighted_spectra(model, layers, covariances) -> dict[str, np.ndarray]:
    return {l.name: weighted_singular_values(weight_matrix(model.get_submodule(l.name)).detach(),
                                             covariances[l.name]) for l in layers}


def weight_spectra(model, layers) -> dict[str, np.ndarray]:
    return {l.name: torch.linalg.svdvals(weight_matrix(model.get_submodule(l.name)).detach().double()).numpy()
            for l in layers}


def positive(values: dict[str, float]) -> dict[str, float]:
    """Sensitivities must be > 0; a noisy estimate of a non-convex block can come out <= 0: floor it at a
    millionth of the largest (such a layer still gets a rank only if the budget has room to spare)."""
    top = max(max(values.values()), 1e-30)
    return {name: max(v, 1e-6 * top) for name, v in values.items()}


def estimate(required: set[str], model, layers, batches, loss_fn, settings, seed: int = 0) -> dict:
    """Every statistic in `required`, each from the first `settings.<stat>_batches` batches."""
    was_training = model.training
    model.eval()  # no dropout: estimates of the function being adapted, not of a noisy copy
    stats = {}
    try:
        if required & {"gradient", "update_spectra"}:
            spectra = "update_spectra" in required
            s, total = gradient_sensitivity(model, layers, batches[: settings.gradient_batches], loss_fn, spectra)
            stats["gradient"] = positive(s)
            if spectra:
                stats["update_spectra"] = {n: torch.linalg.svdvals(g.double()).numpy() for n, g in total.items()}
        if "hessian_trace" in required:
            trace = hutchinson_trace(model, layers, batches[: settings.hessian_batches], loss_fn,
                                     settings.hutchinson_probes, seed)
            stats["hessian_trace_raw"] = trace
            stats["hessian_trace"] = positive(trace)
        if "hessian_opnorm" in required:
            stats["hessian_opnorm"] = positive(hessian_operator_norm(
                model, layers, batches[: settings.hessian_batches], loss_fn, settings.power_iterations, seed))
        if "weight_spectra" in required:
            stats["weight_spectra"] = weight_spectra(model, layers)
        if "weighted_spectra" in required:
            covariances = activation_covariances(model, layers, batches[: settings.covariance_batches],
                                                 loss_fn)
            stats["weighted_spectra"] = weighted_spectra(model, layers, covariances)
    finally:
        model.train(was_training)
    return stats


def summary(stats: dict) -> dict:
    """What goes to sensitivities.json: per-layer scalars, and the leading singular values of each spectrum."""
    out = {}
    for key, values in stats.items():
        if key.endswith("spectra"):
            out[key] = {n: [float(x) for x in v[:16]] for n, v in values.items()}
        else:
            out[key] = {n: float(v) for n, v in values.items()}
    return out

