"""Does EVA's statistic mean what its name says? PEFT's explained-variance ratios (incremental, low-rank PCA,
as `allocator=eva` measures them) against an exact float64 eigendecomposition of the same layer inputs.

On the model and task of the given overrides (default: the offline default, pretrained MiniLM-L6), the runner's
estimation batches, every adapted layer: the relative error of each of the first `--components` ratios, the
largest and the median over the layers, and the seconds PEFT's estimate took. EVA's r is `--rank` (the offline
default's uniform rank, 8); PEFT computes rho x r directions per layer (sensitivity.eva_rho, 2).

    .venv/bin/python bench/eva_reference.py [OVERRIDE ...]
"""

import argparse
import time

import numpy as np
import torch

import lorambo  # noqa: F401  (torchvision fix)
from lorambo.allocation import estimation_batches
from lorambo.config import compose_config
from lorambo.data import load_task
from lorambo.evaluation import loss_and_logits
from lorambo.models import adaptable_layers, build_model, build_tokenizer
from lorambo.sensitivity import estimate


def exact_ratios(model, layers, batches, components: int) -> dict[str, np.ndarray]:
    """float64 eigenvalues of each layer's centred input covariance (non-padding tokens), as ratios."""
    inputs = {l.name: [] for l in layers}
    hooks = [model.get_submodule(l.name).register_forward_pre_hook(
        lambda m, a, name=l.name: inputs[name].append(a[0].detach())) for l in layers]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    out = {}
    for layer in layers:
        X = torch.cat([x[m] for x, m in zip(inputs[layer.name], masks)]).double()
        X = X - X.mean(0)
        eig = torch.linalg.eigvalsh(X.T @ X).flip(0)
        out[layer.name] = (eig / eig.sum())[:components].numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    cfg = compose_config(["logger=none", *args.overrides])
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, cfg.task, tokenizer).eval()
    layers = adaptable_layers(model, cfg.model.target_modules)
    batches = estimation_batches(load_task(cfg.task, cfg.model, tokenizer), cfg, "cpu")
    start = time.perf_counter()
    stats = estimate({"explained_variance"}, model, layers, batches,
                     lambda m, b: loss_and_logits(m, b, cfg.task.type), cfg.sensitivity, cfg.seed, cfg.task.type,
                     rank=args.rank)
    seconds = time.perf_counter() - start
    components = len(next(iter(stats["explained_variance"].values())))
    exact = exact_ratios(model, layers, batches, components)
    errors = np.array([np.abs(stats["explained_variance"][l.name] - exact[l.name]) / exact[l.name] for l in layers])
    print(f"{cfg.model.name} on {cfg.task.name}: {len(layers)} layers, {len(batches)} batches, PEFT's estimate "
          f"{seconds:.1f} s")
    print("direction k:          " + " ".join(f"{k:>6}" for k in range(1, components + 1)))
    print("largest rel. error:   " + " ".join(f"{e:6.1%}" for e in errors.max(0)))
    print("median rel. error:    " + " ".join(f"{e:6.1%}" for e in np.median(errors, 0)))


if __name__ == "__main__":
    main()
