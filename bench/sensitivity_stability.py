"""Which sensitivity statistic to trust: per-layer estimates on the real MiniLM, across seeds.

For each task and seed (the seed sets the head's initialisation and the estimation batches, as in a run), every
statistic is estimated on the pretrained MiniLM at the runner's settings, with and without a head-only warm-up.
Printed per (task, statistic, warm-up): the mean Spearman rank correlation of the 36 per-layer values between
every pair of seeds (does the statistic order the layers the same way whatever the seed?), how many estimates
came out <= 0, the median relative standard error, the seconds it took, and the correlation between the ranks
the square-root law gives at budget r4 across seeds.

    .venv/bin/python bench/sensitivity_stability.py --json runs/sensitivity_stability.json
"""

import argparse
import itertools
import json
import os
import statistics
import time

import numpy as np
import torch
from scipy.stats import spearmanr

import lorambo  # noqa: F401  (torchvision fix)
from lorambo.allocators import allocate
from lorambo.budget import resolve_p_max
from lorambo.config import compose_config
from lorambo.data import load_task
from lorambo.models import adaptable_layers, build_model, build_tokenizer, head_parameters
from lorambo.sensitivity import estimate, warmed_up_head
from lorambo.allocation import estimation_batches
from lorambo.evaluation import loss_and_logits

STATISTICS = ("hessian_trace", "fisher_trace", "gradient")


def measure(task: str, seed: int, warmup: int) -> dict:
    from accelerate.utils import set_seed

    cfg = compose_config(["logger=none", f"task={task}", f"seed={seed}", "budget=r4",
                          f"sensitivity.head_warmup_steps={warmup}"])
    set_seed(seed)
    tokenizer = build_tokenizer(cfg.model)
    data = load_task(cfg.task, cfg.model, tokenizer)
    model = build_model(cfg.model, cfg.task, tokenizer)
    layers = adaptable_layers(model, cfg.model.target_modules)
    p_max = resolve_p_max(cfg.budget, layers)
    batches = estimation_batches(data, cfg, "cpu")
    output_fn = lambda m, b: loss_and_logits(m, b, cfg.task.type)
    out = {"layers": [l.name for l in layers]}
    for stat in STATISTICS:
        start = time.perf_counter()
        with warmed_up_head(model, head_parameters(model, cfg.model.head_modules), batches, output_fn,
                            cfg.sensitivity.head_warmup_steps, cfg.sensitivity.head_warmup_lr):
            stats = estimate({stat}, model, layers, batches, output_fn, cfg.sensitivity, seed, cfg.task.type)
        seconds = time.perf_counter() - start
        ranks = allocate("hessian_offline", layers, p_max, {"hessian_trace": stats[stat]})
        errors = stats["errors"][stat]
        out[stat] = {"raw": [stats[stat + "_raw"][l.name] for l in layers],
                     "se": [errors[l.name]["standard_error"] for l in layers],
                     "non_positive_estimates": sum(stats[stat + "_raw"][l.name] <= 0 for l in layers),
                     "ranks_r4": [ranks.get(l.name, 0) for l in layers], "seconds": seconds}
    return out


def mean_pairwise_spearman(rows: list[list[float]]) -> float:
    return statistics.mean(spearmanr(a, b).statistic for a, b in itertools.combinations(rows, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="rt_snippets,wiki_pairs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--warmups", default="0,32")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for task in args.tasks.split(","):
        for warmup in map(int, args.warmups.split(",")):
            results[f"{task}/{warmup}"] = [measure(task, seed, warmup) for seed in range(args.seeds)]
    print("| task | head warm-up steps | statistic | rank corr. of layers across seeds | rank corr. of r4 ranks "
          "| non-positive estimates per seed | median rel. SE | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for key, runs in results.items():
        task, warmup = key.split("/")
        for stat in STATISTICS:
            raw = [r[stat]["raw"] for r in runs]
            rel_se = [abs(se / v) for r in runs for se, v in zip(r[stat]["se"], r[stat]["raw"])
                      if se is not None and v != 0]
            row = {"layer_rank_correlation": mean_pairwise_spearman(raw),
                   "allocation_rank_correlation": mean_pairwise_spearman([r[stat]["ranks_r4"] for r in runs]),
                   "non_positive": [r[stat]["non_positive_estimates"] for r in runs],
                   "median_relative_se": float(np.median(rel_se)) if rel_se else None,
                   "seconds": statistics.median(r[stat]["seconds"] for r in runs)}
            summary[f"{key}/{stat}"] = row
            se = f"{row['median_relative_se']:.2f}" if row["median_relative_se"] is not None else "-"
            print(f"| {task} | {warmup} | {stat} | {row['layer_rank_correlation']:.2f} | "
                  f"{row['allocation_rank_correlation']:.2f} | {row['non_positive']} | {se} | "
                  f"{row['seconds']:.1f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": results}, f, indent=1, default=float)


if __name__ == "__main__":
    main()
