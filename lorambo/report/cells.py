"""Runs grouped into table cells (model, row, column): mean and spread over seeds, the paper's number, Welch's test against uniform; whether the budget binds."""

import functools
import os
import statistics

import yaml

from lorambo.config import CONF_DIR
from lorambo.report import comparison, paper_tables
from lorambo.report.comparison import welch_p

PERCENT_METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman")


TASK_ORDER = ["cola", "stsb", "mrpc", "rte", "sst2", "mnli", "qnli", "qqp", "wikitext103", "imagenet1k",
              "rt_snippets", "wiki_pairs", "wiki_summaries", "wiki_adapt", "fashion_mnist", "fmnist_adapt"]


@functools.cache
def row_order() -> tuple[str, ...]:
    """Table rows in the papers' order, from the configs: each method, optimizer and allocator yaml says where
    its row goes (`report_order`); a row is placed by the first name it starts with."""
    placed = []
    for group in ("method", "optimizer", "allocator"):
        folder = os.path.join(CONF_DIR, group)
        for file in sorted(os.listdir(folder)):
            with open(os.path.join(folder, file)) as f:
                spec = yaml.safe_load(f) or {}
            if "report_order" in spec:
                placed.append((spec["report_order"], spec["name"]))
    return tuple(name for _, name in sorted(placed))


def row_key(m: dict) -> str:
    """The table row of a run: `full_ft`, `galore_r4`, `lora_r4`, `hessian_offline_r4x1.12`, or for absolute
    budgets (a column there) just the allocator."""
    if m["budget"] is None:  # no adapter: full fine-tuning, a row per optimizer
        return "full_ft" if m["optimizer"] == "adamw" else f"{m['optimizer']}_r{m['optimizer_rank']}"
    if m["budget"].endswith("M"):
        row = m["allocator"]
    else:
        row = f"{'lora' if m['allocator'] == 'uniform' else m['allocator']}_{m['budget']}"
    # a scale policy other than the default is its own row (uniform's scale is the same under every policy)
    scaling = scale_policy(m)
    return row if scaling in (None, "matched") or m["allocator"] == "uniform" else f"{row} [{scaling}]"


def scale_policy(m: dict) -> str | None:
    """The run's update scale policy (None: no LoRA scale, as full fine-tuning and AdaLoRA); runs from before
    lora.scaling existed trained at alpha / r_i."""
    if "lora_scaling" in m:
        return m["lora_scaling"]
    return None if m["allocator"] in ("full_ft", "adalora") else "per_layer"


def baseline_row(row: str) -> str | None:
    """Uniform LoRA at the same budget: the row each allocator is tested against."""
    row = row.split(" [")[0]
    if row == "full_ft" or row.startswith("lora_") or row == "uniform":
        return None
    if "_r" in row:
        budget = row.rsplit("_r", 1)[1]
        return f"lora_r{budget.split('x')[0]}"
    return "uniform"


def column_keys(m: dict) -> list[tuple]:
    absolute = m["budget"] is not None and m["budget"].endswith("M")
    return [(m["task"], metric, m["budget"]) if absolute else (m["task"], metric) for metric in m["reported_metrics"]]


def metric_unit(metric: str) -> float:
    return 100.0 if metric.split("_")[0] in PERCENT_METRICS else 1.0


def build_cells(runs: list[dict], paper: str) -> list[dict]:
    """One record per (model, row, column): values over seeds, the paper's number, the test against uniform."""
    groups = {}
    for m in runs:
        for column in column_keys(m):
            value = m.get(column[1])
            if value is not None:
                groups.setdefault((m["model"], row_key(m), column), []).append((m, value * metric_unit(column[1])))
    lookup = paper_tables.PAPERS[paper]
    cells = []
    for (model, row, column), items in groups.items():
        values = [v for _, v in items]
        paper_model = paper_tables.MODEL_ANALOGUE[paper].get(model, model)
        paper_column = (paper_tables.TASK_ANALOGUE.get(column[0], column[0]), column[1],
                        *[paper_tables.BUDGET_ANALOGUE.get(b, b) for b in column[2:]])
        # the CPU stand-ins of papers 000 and 003 run at half the paper's rank; AdaLoRA's tiny stand-in at its own
        paper_row = (row.split(" [")[0] if paper_model == model or paper == "adalora"
                     else paper_tables.analogue_row(row.split(" [")[0]))
        reference = lookup(paper_model, paper_row, paper_column)
        base = groups.get((model, baseline_row(row), column)) if baseline_row(row) else None
        base_values = [v for _, v in base] if base else []
        runs_here = [m for m, _ in items]
        cells.append({
            "model": model, "row": row, "column": column, "task": column[0], "metric": column[1],
            "budget": column[2] if len(column) == 3 else (runs_here[0]["budget"] or "-"),
            "n": len(values), "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "paper": reference,
            "paper_is_analogue": reference is not None and (paper_model, paper_column) != (model, column),
            "diff_paper": None if reference is None else statistics.mean(values) - reference,
            "vs_uniform": statistics.mean(values) - statistics.mean(base_values) if base_values else None,
            "p_vs_uniform": welch_p(values, base_values) if base_values else None,
            "adapter_params": statistics.mean(m["adapter_params"] for m in runs_here),
            "adapter_mib": statistics.mean(
                m["adapter_mib"] if m["budget"] is not None else m["trainable_params"] * 4 / 2**20
                for m in runs_here),
            "optimizer_mib": statistics.mean(m["optimizer_state_bytes"] for m in runs_here) / 2**20,
            "peak_mib": statistics.mean(m.get("peak_memory_bytes") or 0 for m in runs_here) / 2**20,
            "step_seconds": statistics.mean(m["step_seconds_median"] for m in runs_here),
            "effective_rank": statistics.mean(m["effective_rank"] for m in runs_here)
            if all("effective_rank" in m for m in runs_here) else None,
            "paper_memory": paper_tables.paper_memory(paper, paper_model, paper_row),
            "scale": " / ".join(sorted({scale_policy(m) or "—" for m in runs_here})),
            "tuned": all(m.get("tuned") for m in runs_here),
            "runs": runs_here,
        })
    return cells


def row_sort_key(row: str):
    order = row_order()
    head = next((i for i, name in enumerate(order) if row.startswith(name)), len(order))
    return head, row


def column_sort_key(column: tuple):
    task = TASK_ORDER.index(column[0]) if column[0] in TASK_ORDER else len(TASK_ORDER)
    budget = float(column[2][:-1]) if len(column) == 3 else 0.0
    return task, column[0], budget, column[1]


def value_text(value: float, metric: str) -> str:
    return f"{value * metric_unit(metric):.2f}"


def capacity_lines(runs: list[dict], curves: dict) -> list[str]:
    """One line per table (model, task, metric) with two or more budgets: does uniform's metric move between its
    smallest and largest budget beyond seed noise? If not, capacity does not bind and the allocator rows cannot
    be read as a ranking."""
    budgets = {}
    for m in runs:
        if comparison.curve_name(m) is not None:
            for metric in m["reported_metrics"]:
                budgets.setdefault((m["model"], m["task"], metric), set()).add(m["budget"])
    lines = []
    for (model, task, metric), by_curve in sorted(curves.items()):
        if len(budgets[(model, task, metric)]) < 2:
            continue
        where = f"{model} {task} {metric}"
        uniform = by_curve.get("uniform", [])
        check = comparison.budget_check(uniform, metric)
        if check["budgets"] < 2:
            lines.append(f"**Budget sensitivity unknown** ({where}): uniform ran at {check['budgets']} budget(s); run "
                         f"it at the table's smallest and largest budgets to tell whether capacity binds here.")
            continue
        ends = (f"uniform {value_text(check['small'], metric)} at {check['small_params']:,.0f} adapter parameters "
                f"(n={len(uniform[0][1])}), {value_text(check['large'], metric)} at {check['large_params']:,.0f} "
                f"(n={len(uniform[-1][1])})")
        p = "" if check["p"] is None else f", Welch p={check['p']:.2g}"
        if check["binds"] is None:
            lines.append(f"**Budget sensitivity unknown** ({where}): {ends}; fewer than 2 seeds at an end.")
        elif check["binds"]:
            lines.append(f"**Budget binds** ({where}): {ends}{p}: capacity limits uniform here, so allocator "
                         f"differences can be read.")
        else:
            lines.append(f"**Capacity is not binding** ({where}): {ends}{p}, not beyond seed noise: allocator "
                         f"differences cannot be read from this table.")
    return lines
