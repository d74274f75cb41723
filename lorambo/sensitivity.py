"""Per-layer statistics the allocators need, measured on the base model before the adapter exists.

Every estimator works on the adaptable weights W_i only (the rest of the model stays frozen, so autograd
does no work for it) and takes a `loss_fn(model, batch) -> loss`.
"""

import math
import sys
import weakref
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorambo.budget import LayerSpec
from lorambo.errors import LoramboError


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as the (d_out, d_in) matrix LoRA adapts: Conv1D is stored (in, out); Conv2d flattens its kernel."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.t()
    if getattr(module.weight, "quant_state", None) is not None:  # a 4-bit base: dequantised one layer at a time
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    return module.weight.reshape(module.weight.shape[0], -1)


# statistics that differentiate the loss with respect to the base weights: a 4-bit base has no such gradients
WEIGHT_GRADIENT_STATS = {"gradient", "update_spectra", "mean_gradient", "gradient_saliency", "hessian_trace",
                         "fisher_trace", "hessian_opnorm"}


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


Samples = dict[str, np.ndarray]  # per layer, one value per (batch, probe or sample): the estimate is their mean


def as_samples(layers, rows: list[torch.Tensor]) -> Samples:
    """Per-layer arrays from a list of per-draw (n_layers,) tensors, read back to the host once."""
    table = torch.stack(rows).cpu().double().numpy()
    return {l.name: table[:, i] for i, l in enumerate(layers)}


def squared_norms(grads) -> torch.Tensor:
    """(n_layers,) float64 squared Frobenius norms of per-layer gradients, kept on the device."""
    return torch.stack([g.pow(2).sum(dtype=torch.float64) for g in grads])


def sample_means(samples: Samples) -> dict[str, float]:
    return {name: float(v.mean()) for name, v in samples.items()}


def gradient_sensitivity(model, layers, batches, loss_fn, keep_sum: bool = True
                         ) -> tuple[Samples, dict[str, torch.Tensor]]:
    """||grad_{W_i} L_t||_F^2 for every batch t (s_i is their mean), and (if keep_sum) the summed gradient, an
    early estimate of the update; squared norms stay on the device until the end (no host sync per batch)."""
    rows = []
    total = {}
    with only_weights_require_grad(model, layers) as weights:
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), weights)
            rows.append(squared_norms(grads))
            if keep_sum:
                for layer, g in zip(layers, grads):
                    g = to_matrix_grad(model.get_submodule(layer.name), g.detach())
                    total[layer.name] = total[layer.name] + g if layer.name in total else g.clone()
    return as_samples(layers, rows), total


def hutchinson_trace(model, layers, batches, loss_fn, probes: int = 1, seed: int = 0) -> Samples:
    """Tr(H_i) for every block at once: one Rademacher probe v over all W_i and one Hessian-vector product give
    v_i . (Hv)_i for every i; one sample per (batch, probe), the estimate is their mean."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with only_weights_require_grad(model, layers) as weights, twice_differentiable():
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), weights, create_graph=True)
            for k in range(probes):
                vs = [(torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w) for w in weights]
                hvs = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=k < probes - 1)
                rows.append(torch.stack([(v.double() * hv.double()).sum() for v, hv in zip(vs, hvs)]))
    return as_samples(layers, rows)


def sampled_label_loss(logits: torch.Tensor, task_type: str, generator: torch.Generator, labels=None
                       ) -> tuple[torch.Tensor, int]:
    """(sum over outputs of the loss at labels drawn from the model's own predictive distribution, number of
    outputs). Classification and language modelling: y ~ softmax(logits) per example / per next-token position;
    regression (one output, squared error (f - y)^2): y = f + e with e ~ N(0, 1/2), so that E||grad||^2 is the
    Gauss-Newton 2 J^T J of that loss."""
    logits = logits.float()
    if task_type == "lm":
        logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # position t predicts token t + 1
    elif task_type == "instruct":  # the response's positions only: the prompt and padding carry no loss
        logits = logits[:, :-1][labels[:, 1:] != -100]
    if logits.shape[-1] == 1:
        f = logits.reshape(-1)
        noise = torch.randn(f.shape, generator=generator).to(f) * math.sqrt(0.5)
        return (f - (f.detach() + noise)).pow(2).sum(), f.numel()
    probabilities = logits.detach().softmax(-1).cpu()
    y = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1).to(logits.device)
    return F.cross_entropy(logits, y, reduction="sum"), len(y)


def fisher_trace(model, layers, batches, output_fn, task_type: str, samples: int = 1, seed: int = 0,
                 empirical: bool = False) -> Samples:
    """Tr(G_i), the Gauss-Newton (= Fisher, for softmax cross-entropy) trace per layer, per output:
    E_x E_{y ~ p(y|x)} ||grad_{W_i} log p(y|x)||_F^2. With labels drawn from the model, each output's score has
    mean zero given the inputs, so the cross terms of ||grad sum_n loss_n||^2 vanish in expectation and
    ||grad sum_n loss_n(y_n)||^2 / N is an unbiased estimate from one ordinary backward (one sample per batch
    and draw). It is never negative. `empirical`: the true labels instead (the empirical Fisher), where the
    cross terms do not vanish, so each example is differentiated alone (one backward per example).
    `output_fn(model, batch) -> (mean loss, logits)`."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with only_weights_require_grad(model, layers) as weights:
        for batch in batches:
            if empirical:
                size = len(next(iter(batch.values())))
                total = 0
                for n in range(size):
                    one = {k: v[n:n + 1] for k, v in batch.items()}
                    grads = torch.autograd.grad(output_fn(model, one)[0], weights)
                    total = total + squared_norms(grads)
                rows.append(total / size)
                continue
            logits = output_fn(model, batch)[1]
            for k in range(samples):
                loss, count = sampled_label_loss(logits, task_type, generator, batch.get("labels"))
                grads = torch.autograd.grad(loss, weights, retain_graph=k < samples - 1)
                rows.append(squared_norms(grads) / count)
    return as_samples(layers, rows)


def hessian_operator_norm(model, layers, batches, loss_fn, iterations: int = 10, seed: int = 0) -> Samples:
    """||H_i||_op per block by power iteration on Hessian-vector products restricted to block i (one sample per
    batch: that batch's Hessian; the estimate is their mean)."""
    generator = torch.Generator().manual_seed(seed)
    norms = {l.name: np.zeros(len(batches)) for l in layers}
    with only_weights_require_grad(model, layers) as weights, twice_differentiable():
        for t, batch in enumerate(batches):
            grads = torch.autograd.grad(loss_fn(model, batch), weights, create_graph=True)
            for i, (layer, w, g) in enumerate(zip(layers, weights, grads)):
                v = torch.randn(w.shape, generator=generator).to(w)
                v /= v.norm()
                value = 0.0
                for _ in range(iterations):
                    (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True)
                    value = float((v * hv).sum())
                    v = hv / hv.norm().clamp_min(1e-30)
                norms[layer.name][t] = abs(value)
    return norms


def _same_conv_types() -> tuple[type, ...]:
    """timm's TensorFlow-"SAME" convolutions (the tf_ models: EfficientNet-Lite0's stem) pad their input inside
    forward, so a hook sees it without the border their patches include. No module is one unless timm is loaded."""
    if "timm" not in sys.modules:
        return ()
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    return (Conv2dSame, Conv2dSameExport)


def layer_inputs_as_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of length d_in: tokens for Linear/Conv1D, unfolded patches for Conv2d (one per
    output position, as the convolution sees them)."""
    if isinstance(module, nn.Conv2d):
        if isinstance(module, _same_conv_types()):
            from timm.layers import pad_same
            x = pad_same(x, module.kernel_size, module.stride, module.dilation)
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
        geometry = ((type(module), module.kernel_size, module.dilation, module.padding, module.stride)
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
        return eigenvalues.sqrt().flip(0).cpu().numpy()
    return torch.linalg.svdvals(W @ psd_sqrt(G)).cpu().numpy()


def weighted_spectra(model, layers, covariances) -> dict[str, np.ndarray]:
    return {l.name: weighted_singular_values(weight_matrix(model.get_submodule(l.name)).detach(),
                                             covariances[l.name]) for l in layers}


def weight_spectra(model, layers) -> dict[str, np.ndarray]:
    return {l.name: torch.linalg.svdvals(weight_matrix(model.get_submodule(l.name)).detach().double()).cpu().numpy()
            for l in layers}


def positive(values: dict[str, float]) -> dict[str, float]:
    """Sensitivities must be > 0 for the square-root law; a noisy estimate of a non-convex block can come out
    <= 0: floor it at a millionth of the largest (such a layer gets rank 1 and more only if the budget has room
    to spare). A floored value is only ever a weight in an allocation objective, never a divisor."""
    top = max(max(values.values()), 1e-30)
    return {name: max(v, 1e-6 * top) for name, v in values.items()}


@contextmanager
def warmed_up_head(model, head: list[nn.Parameter], batches, output_fn, steps: int, lr: float):
    """Inside: the classification head trained alone for `steps` AdamW steps on `batches` (cycled; the body and
    its dropout stay in eval mode); afterwards every head parameter is back to its value before."""
    if steps <= 0 or not head:
        yield
        return
    saved = [p.detach().clone() for p in head]
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(head, lr=lr, weight_decay=0.0)
        for t in range(steps):
            loss = output_fn(model, batches[t % len(batches)])[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(head, saved):
                p.copy_(value)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def estimate(required: set[str], model, layers, batches, output_fn, settings, seed: int = 0,
             task_type: str = "classification", rank: int = 1) -> dict:
    """Every statistic in `required`, each from the first `settings.<stat>_batches` batches. A scalar statistic
    gives `stats[name]` (floored positive, for allocators), `stats[name + "_raw"]` (the plain mean) and, under
    `stats["errors"][name]`, each layer's standard error over its samples and count of non-positive samples.
    `output_fn(model, batch) -> (mean loss, logits)`; `rank`: the uniform rank at the budget (EVA's r)."""
    loss_fn = lambda m, b: output_fn(m, b)[0]
    was_training = model.training
    model.eval()  # no dropout: estimates of the function being adapted, not of a noisy copy
    stats, samples = {}, {}
    try:
        if required & {"gradient", "update_spectra", "mean_gradient", "gradient_saliency"}:
            keep_sum = bool(required & {"update_spectra", "mean_gradient", "gradient_saliency"})
            gradient_batches = batches[: settings.gradient_batches]
            samples["gradient"], total = gradient_sensitivity(model, layers, gradient_batches, loss_fn, keep_sum)
            if "update_spectra" in required:
                stats["update_spectra"] = {n: torch.linalg.svdvals(g.double()).cpu().numpy() for n, g in total.items()}
            if required & {"mean_gradient", "gradient_saliency"}:
                stats["mean_gradient"] = {n: g / len(gradient_batches) for n, g in total.items()}
                stats["gradient_saliency"] = gradient_saliency(model, stats["mean_gradient"])
        if "explained_variance" in required:
            stats["explained_variance"], stats["input_components"] = explained_variance(
                model, layers, batches, rank, settings.eva_rho, settings.eva_tau, settings.eva_max_batches,
                task_type in ("lm", "instruct"))
        if "hessian_trace" in required:
            samples["hessian_trace"] = hutchinson_trace(model, layers, batches[: settings.hessian_batches], loss_fn,
                                                        settings.hutchinson_probes, seed)
        if "fisher_trace" in required:
            samples["fisher_trace"] = fisher_trace(model, layers, batches[: settings.fisher_batches], output_fn,
                                                   task_type, settings.fisher_samples, seed,
                                                   settings.fisher_labels == "true")
        if "hessian_opnorm" in required:
            samples["hessian_opnorm"] = hessian_operator_norm(
                model, layers, batches[: settings.hessian_batches], loss_fn, settings.power_iterations, seed)
        if "weight_spectra" in required:
            stats["weight_spectra"] = weight_spectra(model, layers)
        if "weighted_spectra" in required:
            covariances = activation_covariances(model, layers, batches[: settings.covariance_batches],
                                                 loss_fn)
            stats["weighted_spectra"] = weighted_spectra(model, layers, covariances)
    finally:
        model.train(was_training)
    for name, values in samples.items():
        raw = sample_means(values)
        stats[name + "_raw"], stats[name] = raw, positive(raw)
        stats.setdefault("errors", {})[name] = error_bars(values)
    return stats


def gradient_saliency(model, mean_gradients: dict[str, torch.Tensor]) -> dict[str, float]:
    """GoRA's importance of a layer: mean_jk |W ⊙ G| with G the gradient averaged over the estimation batches."""
    return {name: float((weight_matrix(model.get_submodule(name)).detach().double() * G.double()).abs().mean())
            for name, G in mean_gradients.items()}


@torch.no_grad()
def explained_variance(model, layers, batches, rank: int, rho: float, tau: float, max_batches: int, lm: bool
                       ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """EVA's statistic by PEFT's own code (get_eva_state_dict at r = `rank`, the uniform rank, and `rho`): an
    incremental PCA of each layer's input tokens, padding left out, with round(rho r) directions per layer,
    repeated until the directions PEFT's own rank distribution (the top r x layers ratios) needs stop moving,
    cosine >= tau. Per layer: the explained-variance ratios of all round(rho r) directions, and the directions
    (rows, for A). PEFT keeps both inside its hooks, so the hooks, and its map of layers fed the same input
    (query, key, value: one hook), are recorded as PEFT makes them."""
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora import eva as peft_eva
    from transformers.pytorch_utils import Conv1D

    convolutions = [l.name for l in layers if not isinstance(model.get_submodule(l.name), (nn.Linear, Conv1D))]
    if convolutions:
        raise LoramboError(f"allocator=eva: PEFT's EVA adapts only Linear layers and this model adapts "
                           f"convolutions ({convolutions[0]}, ...); choose another allocator")
    recorded, groups, batch_shape = {}, [], [None]

    def batch_tokens_only(hook_class):
        """A hook that sees a layer's calls on the batch's tokens only: DeBERTa also runs query_proj and key_proj
        on its relative-position embeddings, which are no data (and PEFT's token mask cannot index them)."""
        class BatchTokensOnly(hook_class):
            def __call__(self, module, inputs, output):
                x = inputs[0] if isinstance(inputs, tuple) else inputs
                if batch_shape[0] is None or tuple(x.shape[:2]) == batch_shape[0]:
                    super().__call__(module, inputs, output)
        return BatchTokensOnly

    class RecordedSVDHook(batch_tokens_only(peft_eva.SVDHook)):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            recorded[kwargs["name"]] = self

    find_equal_values = peft_eva.find_equal_values

    def recorded_groups(hashes):
        found = find_equal_values(hashes)
        groups.extend(found.values())
        return found

    calls = [0]

    def forward(m, batch):  # PEFT cycles the batches until convergence: bound it
        calls[0] += 1
        batch_shape[0] = tuple(batch["input_ids"].shape[:2]) if "input_ids" in batch else None
        if calls[0] > max_batches:
            raise LoramboError(f"allocator=eva: PEFT's SVD did not converge (cosine {tau}) in {max_batches} "
                               f"batches; raise sensitivity.eva_max_batches or lower sensitivity.eva_tau")
        return m(**batch)

    config = LoraConfig(r=rank, target_modules=[l.name for l in layers], init_lora_weights="eva",
                        eva_config=EvaConfig(rho=rho, tau=tau, use_label_mask=lm))
    saved = peft_eva.SVDHook, peft_eva.HashHook, peft_eva.find_equal_values
    peft_eva.SVDHook, peft_eva.HashHook = RecordedSVDHook, batch_tokens_only(peft_eva.HashHook)
    peft_eva.find_equal_values = recorded_groups
    try:
        peft_eva.get_eva_state_dict(model, batches, config, forward_fn=forward, show_progress_bar=False)
    finally:
        peft_eva.SVDHook, peft_eva.HashHook, peft_eva.find_equal_values = saved
    hooked = {name: group[0] for group in groups for name in group}  # PEFT hooks a group's first layer
    ratios, directions = {}, {}
    for layer in layers:
        svd = recorded[hooked.get(layer.name, layer.name)].svd
        ratios[layer.name] = svd.explained_variance_ratio_.double().cpu().numpy()
        directions[layer.name] = svd.components_
    return ratios, directions


def error_bars(samples: Samples) -> dict[str, dict]:
    """Per layer: the standard error of the mean over its samples (None with one sample), the number of
    samples, and how many came out <= 0."""
    out = {}
    for name, v in samples.items():
        se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
        out[name] = {"standard_error": se, "samples": len(v), "non_positive": int((v <= 0).sum())}
    return out


MATRICES = {"mean_gradient", "input_components"}  # per-layer matrices an initialisation reads: not summarised


def summary(stats: dict) -> dict:
    """What goes to sensitivities.json: per-layer scalars (floored and raw), their error bars, and the leading
    singular values of each spectrum."""
    out = {}
    for key, values in stats.items():
        if key in MATRICES:
            continue
        if key.endswith("spectra") or key == "explained_variance":
            out[key] = {n: [float(x) for x in v[:16]] for n, v in values.items()}
        elif key == "errors":
            out[key] = values
        else:
            out[key] = {n: float(v) for n, v in values.items()}
    return out
