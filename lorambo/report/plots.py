"""The report's PNG plots: metric against budget, rank heat maps, rank histories, savings curves."""

import math
import os
import statistics

from lorambo.report import comparison
from lorambo.report.cells import metric_unit, row_sort_key
from lorambo.results import read_jsonl


def slug(*parts) -> str:
    return "_".join(str(p).replace("/", "-").replace(".", "p") for p in parts if p and p != "-")


def plot_all(cells: list[dict], out_dir: str) -> list[str]:
    """metric vs adapter parameters per allocator; metric vs optimizer state per method (tables with full
    fine-tuning rows: paper 003's memory trade-off); ranks per layer per allocator (heat map, unless every row is
    one rank everywhere); rank over training where it changes (hessian_online's growth, AdaRankGrad)."""
    import matplotlib

    matplotlib.use("Agg")
    return [*metric_plots(cells, out_dir), *rank_heat_maps(cells, out_dir), *rank_histories(cells, out_dir)]


def metric_plot(series, xlabel, name, model, task, metric, out_dir) -> str:
    """One line (or point) per series: (label, [(x, mean, std)]), log x."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series:
        x, y, err = zip(*sorted(points))
        ax.errorbar(x, y, yerr=[0 if math.isnan(e) else e for e in err], marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(f"{model} {task}: {metric} against {xlabel}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, slug(metric, name, model, task) + ".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def metric_plots(cells: list[dict], out_dir: str) -> list[str]:
    written = []
    for model, task, metric in sorted({(c["model"], c["task"], c["metric"]) for c in cells}):
        here = sorted((c for c in cells if (c["model"], c["task"], c["metric"]) == (model, task, metric)),
                      key=lambda c: row_sort_key(c["row"]))
        adapters = [c for c in here if c["runs"][0]["budget"] is not None]
        if adapters:
            written.append(metric_plot(
                [(allocator, [(c["adapter_params"], c["mean"], c["std"]) for c in adapters
                              if c["runs"][0]["allocator"] == allocator])
                 for allocator in sorted({c["runs"][0]["allocator"] for c in adapters})],
                "adapter parameters", "vs_params", model, task, metric, out_dir))
        if len(adapters) < len(here):  # full fine-tuning rows: every row by what its optimizer holds
            written.append(metric_plot(
                [(f"{c['row']} {c['budget']}" if c["budget"].endswith("M") else c["row"],  # as row_key names rows
                  [(c["optimizer_mib"], c["mean"], c["std"])]) for c in here],
                "optimizer state MiB", "vs_optimizer_state", model, task, metric, out_dir))
    return written


def rank_heat_maps(cells: list[dict], out_dir: str) -> list[str]:
    """One per (model, task, budget): rows the allocators' seed-averaged ranks, columns the layers."""
    import matplotlib.pyplot as plt
    import numpy as np

    seen, written = set(), []
    for c in cells:
        key = (c["model"], c["task"], c["budget"])
        if key in seen or c["budget"] == "-":
            continue
        seen.add(key)
        rows = {}
        for d in cells:
            if (d["model"], d["task"], d["budget"]) == key and d["runs"][0].get("ranks"):
                rows[d["row"]] = d["runs"]
        if not rows or all(len(set(m["ranks"].values())) == 1 for runs in rows.values() for m in runs):
            continue  # nothing to see: every row is one rank on every layer
        layers = list(next(iter(rows.values()))[0]["ranks"])
        names = sorted(rows, key=row_sort_key)
        grid = np.array([[statistics.mean(m["ranks"].get(layer, 0) for m in rows[n]) for layer in layers]
                         for n in names])
        fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.15 + 3), 1 + 0.4 * len(names)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("layer (model order)")
        ax.set_title(f"{key[0]} {key[1]} budget {key[2]}: rank per layer (mean over seeds)")
        fig.colorbar(image, ax=ax, label="rank")
        fig.tight_layout()
        path = os.path.join(out_dir, slug("ranks", *key) + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def rank_histories(cells: list[dict], out_dir: str) -> list[str]:
    """Rank over training: the first seed of every row that recorded a history where it changed."""
    from lorambo.plots import plot_rank_history

    done, written = set(), []
    for c in cells:
        first = sorted(c["runs"], key=lambda m: m["seed"])[0]
        history_path = os.path.join(first["run_dir"], "rank_history.jsonl")
        key = (c["model"], c["task"], c["row"], c["budget"])
        if key in done or not os.path.exists(history_path):
            continue
        done.add(key)
        history = read_jsonl(history_path)
        if all(h["ranks"] == history[0]["ranks"] for h in history):
            continue  # a fixed rank (GaLore): no history to draw
        layers = list(history[-1]["ranks"])
        path = os.path.join(out_dir, slug("rank_history", *key) + ".png")
        plot_rank_history(history, layers, path, f"{c['model']} {c['task']} {c['row']}: rank of every layer "
                                                 f"over training (seed {first['seed']})")
        written.append(path)
    return written


def savings_plots(curves: dict, out_dir: str) -> list[str]:
    """Metric against adapter parameters, a line per allocator through its seed means, the 95% bootstrap interval
    of each mean shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (model, task, metric), by_curve in sorted(curves.items()):
        if len(by_curve.get("uniform", [])) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted(by_curve, key=row_sort_key):
            x = [p for p, _ in by_curve[name]]
            unit = metric_unit(metric)
            ax.plot(x, [statistics.mean(v) * unit for _, v in by_curve[name]], marker="o", label=name,
                    linewidth=2.5 if name == "uniform" else 1.5)
            bands = [comparison.mean_interval(v) for _, v in by_curve[name]]
            ax.fill_between(x, [lo * unit for lo, _ in bands], [hi * unit for _, hi in bands], alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("adapter parameters")
        ax.set_ylabel(metric)
        ax.set_title(f"{model} {task}: {metric} against adapter parameters (95% bootstrap of the mean)", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, slug("savings", metric, model, task) + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
