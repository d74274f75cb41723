"""`lorambo-report PATH...`: the papers' tables and the usual plots from run folders (never the network).

Reads every metrics.json below the given folders; groups runs into cells (model, table row, task column) and
prints mean +- sample std over seeds, the paper's number beside it where one exists (for the CPU stand-ins,
the number of the model and task they stand for), the difference, and each row's difference from uniform LoRA
with Welch's t-test over seeds (significant: p < 0.05). Sweeps (folders with Hydra's multirun.yaml) also
report the cells that have no result. Writes report.{md,tex,csv} and PNG plots into --out.
"""

import argparse
import collections
import functools
import glob
import json
import math
import os
import statistics
import sys

import yaml

from lorambo import comparison, paper_tables
from lorambo.comparison import welch_p
from lorambo.config import CONF_DIR
from lorambo.errors import LoramboError
from lorambo.results import read_jsonl

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



# --- reading runs

def read_yaml(path: str):
    with open(path) as f:
        return yaml.safe_load(f)


def load_run(run_dir: str) -> dict:
    """metrics.json, with what older runs did not record filled in from Hydra's saved config."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    m["run_dir"] = run_dir
    if "budget" not in m:
        cfg_path = os.path.join(run_dir, ".hydra", "config.yaml")
        cfg = read_yaml(cfg_path) if os.path.exists(cfg_path) else {}
        from omegaconf import OmegaConf

        from lorambo.budget import budget_label
        opt = cfg.get("optimizer", {"name": "adamw"})
        m.setdefault("optimizer", opt["name"])
        m.setdefault("optimizer_rank", opt.get("rank"))
        m["budget"] = None if m["allocator"] == "full_ft" or "budget" not in cfg else budget_label(
            OmegaConf.create(cfg["budget"]))
        m.setdefault("main_metric", cfg.get("task", {}).get("main_metric", "accuracy"))
    m.setdefault("reported_metrics", [m["main_metric"]])
    return m


def find_runs(paths: list[str]) -> tuple[list[dict], list[str]]:
    """(finished runs, lines about sweep cells without a result). A cell one sweep lost but another given
    folder holds (a rerun of the same model, task, method and seed) is not missing."""
    runs, missing, damaged = [], [], []
    for path in paths:
        if not os.path.exists(path):
            raise LoramboError(f"no such folder: '{path}'; give run or sweep folders (e.g. runs/multirun/DATE/TIME)")
        for metrics in sorted(glob.glob(os.path.join(path, "**", "metrics.json"), recursive=True)):
            try:
                run = load_run(os.path.dirname(metrics))
                if run.get("eval_splits") == ["dev"]:  # a tuned sweep's search run: scored on a dev split
                    continue
                runs.append(run)
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # cut or edited by hand: the rest stands
                damaged.append(f"damaged: {metrics} ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                               f"left out: rerun that cell")
        for sweep in sorted(glob.glob(os.path.join(path, "**", "multirun.yaml"), recursive=True)):
            missing += missing_cells(os.path.dirname(sweep))
    done = {run_identity(m) for m in runs} - {None}
    return runs, damaged + [line for line, cell in missing if not done or cell_identity(cell) not in done]


def tuning_records(paths: list[str]) -> dict[str, dict]:
    """Every tuned sweep under the given folders (its tuning.json: the grid, each point's dev score, the
    choice), by sweep folder."""
    from lorambo.tuning import TUNING_FILE, read_tuning

    found = {os.path.dirname(f) for path in paths
             for f in glob.glob(os.path.join(path, "**", TUNING_FILE), recursive=True)}
    return {d: read_tuning(d) for d in sorted(found)}


def mark_tuned(runs: list[dict], tuned: dict[str, dict]) -> None:
    """m["tuned"]: the run is a final run of a tuned sweep (below a folder with tuning.json)."""
    for m in runs:
        m["tuned"] = any(os.path.abspath(m["run_dir"]).startswith(os.path.abspath(d) + os.sep) for d in tuned)


def protocol_line(runs: list[dict], tuned: dict[str, dict]) -> str:
    """The table's header: tuned (every row had the same learning-rate search), untuned, or which rows were."""
    flags = [m["tuned"] for m in runs]
    if all(flags):  # several tuned sweeps (a grid widened by a second one): every factor searched
        records = list(tuned.values())
        factors = sorted({f for r in records for f in r["lr_factors"]})
        scalings = list(dict.fromkeys(x for r in records for x in r["scalings"]))
        return (f"**Tuned**: every row's learning rate (x {', '.join(f'{f:g}' for f in factors)} of its own, over "
                f"{len(records)} sweep(s): the search below says which rows had which) and, for LoRA rows, scale "
                f"policy ({', '.join(scalings)}) chosen on a dev split ({records[0]['dev_fraction']:g} of the "
                f"training split, seed {records[0]['search_seed']}); the chosen point over seeds on the validation "
                f"split.")
    if not any(flags):
        return ("**Untuned**: one learning rate per model (train.lr) for every row; a ranking of rows is not "
                "evidence until each row has had the same search (hydra/sweeper=tuned).")
    return ("**Mixed**: some rows come from a tuned sweep and some not; compare rows only within one protocol: "
            + ", ".join(sorted({row_key(m) for m, f in zip(runs, flags) if f})) + " tuned.")


def search_table(tuned: dict[str, dict]) -> list[str]:
    """Markdown lines: per tuned cell, every grid point's dev score and the choice."""
    lines = []
    for sweep, record in tuned.items():
        lines += ["", f"Learning-rate search ({sweep}):", "", "| cell | grid: dev score | chosen | dev score |",
                  "|---|---|---|---|"]
        constant = set.intersection(*[set(c["overrides"]) for c in record["cells"]]) if record["cells"] else set()
        for c in record["cells"]:
            cell = " ".join(o for o in c["overrides"] if o not in constant) or " ".join(c["overrides"])
            point = lambda p: " ".join(f"{k.split('.')[-1]}={v}" for k, v in p.items())
            grid = "; ".join(f"{point(g['point'])}: " + ("failed" if g["dev_score"] is None else f"{g['dev_score']:.4f}")
                             for g in c["grid"])
            chosen = "none finished" if c["chosen"] is None else point(c["chosen"])
            lrs = sorted({g["point"]["train.lr"] for g in c["grid"]})
            if c["chosen"] is not None and len(lrs) > 1 and c["chosen"]["train.lr"] in (lrs[0], lrs[-1]):
                chosen += " (at the grid's edge: the best rate may lie beyond it)"
            score = "—" if c["dev_score"] is None else f"{c['dev_score']:.4f}"
            lines.append(f"| {cell} | {grid} | {chosen} | {score} |")
    return lines


# what does not change a run's result: where it logs, and whether it was resumed
NOT_RESULT_KEYS = ("logger", "resume")


def canonical_config(cfg: dict) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k not in NOT_RESULT_KEYS}, sort_keys=True, default=str)


def run_identity(m: dict) -> str | None:
    """The run's composed config (Hydra's .hydra/config.yaml), as text to compare."""
    path = os.path.join(m["run_dir"], ".hydra", "config.yaml")
    return canonical_config(read_yaml(path)) if os.path.exists(path) else None


def cell_identity(cell: list[str]) -> str | None:
    """The config a sweep cell would have run, in run_identity's terms (None if it no longer composes)."""
    from omegaconf import OmegaConf

    from lorambo.config import compose_config

    try:
        cfg = compose_config([o for o in cell if not o.startswith("hydra")])
    except Exception:  # a config renamed since the sweep ran: the cell stays listed as missing
        return None
    return canonical_config(OmegaConf.to_container(cfg, resolve=False))


def missing_cells(sweep_dir: str) -> list[tuple[str, list[str]]]:
    """The jobs a sweep was asked to run (from its multirun.yaml) that left no metrics.json, with the reason
    when the run folder says it (error.txt): (line, the job's overrides)."""
    from lorambo.config import sweep_cells

    with open(os.path.join(sweep_dir, "multirun.yaml")) as f:
        saved = yaml.safe_load(f)["hydra"]
    cells = sweep_cells(saved["sweeper"].get("params"), saved["overrides"]["task"])
    constant = set.intersection(*map(set, cells))  # overrides every job shares say nothing about a cell
    lines = []
    for num, cell in enumerate(cells):
        folders = glob.glob(os.path.join(sweep_dir, f"{num}_*"))
        if any(os.path.exists(os.path.join(d, "metrics.json")) for d in folders):
            continue
        varying = " ".join(o for o in cell if o not in constant)
        reason = "not run (sweep stopped or job lost)" if not folders else "no metrics.json (killed?)"
        for d in folders:
            if os.path.exists(os.path.join(d, "error.txt")):
                with open(os.path.join(d, "error.txt")) as f:
                    reason = "failed: " + f.read().strip().splitlines()[0]
        lines.append((f"missing: {sweep_dir} job {num} ({varying or ' '.join(cell)}): {reason}", cell))
    return lines


# --- cells

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


# --- does the budget matter, and what allocation saves

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


def environment_lines(runs: list[dict]) -> list[str]:
    """Header lines when one table's runs were not made alike: a model fine-tuned from different pretrained bases
    (base_sha256), or different library versions (a run's numbers change with them, issue 17). Runs from before
    these were recorded are counted, not guessed."""
    lines = []
    by_model = {}
    for m in runs:
        if m.get("base_sha256"):
            by_model.setdefault(m["model"], {}).setdefault(m["base_sha256"], []).append(m)
    for model, bases in sorted(by_model.items()):
        if len(bases) > 1:
            counts = ", ".join(f"{sha[:12]} ({len(ms)} runs)" for sha, ms in sorted(bases.items()))
            lines.append(f"**Mixed bases** ({model}): the runs start from different pretrained bases: {counts}; "
                         f"compare rows only within one base.")
    versions = {}  # {library: Counter(version: runs)}
    for m in runs:
        for lib, version in (m.get("versions") or {}).items():
            versions.setdefault(lib, collections.Counter())[version] += 1
    mixed = {lib: v for lib, v in sorted(versions.items()) if len(v) > 1}
    if mixed:
        libs = "; ".join(f"{lib} " + ", ".join(f"{ver} ({n} runs)" for ver, n in sorted(v.items()))
                         for lib, v in mixed.items())
        lines.append(f"**Mixed library versions**: {libs}; numbers can differ by more than seed noise across them.")
    unrecorded = sum(1 for m in runs if not m.get("versions"))
    if unrecorded and unrecorded < len(runs):
        lines.append(f"{unrecorded} of {len(runs)} runs predate the record of library versions: their environment "
                     f"cannot be compared with the others'.")
    return lines


def savings_tables(curves: dict, fmt: str) -> str:
    """`--savings`: per table, for each allocator, the adapter parameters it needs to reach uniform's metric at
    each of uniform's budgets, as a ratio to uniform's (below 1: it saves parameters), with a 95% bootstrap
    interval over seeds."""
    blocks, records = [], []
    for (model, task, metric), by_curve in sorted(curves.items()):
        uniform = by_curve.get("uniform", [])
        others = [name for name in sorted(by_curve, key=row_sort_key) if name != "uniform"]
        if len(uniform) < 2 or not others:
            continue
        header = ["allocator"] + [f"uniform {x:,.0f}: {value_text(statistics.mean(v), metric)}" for x, v in uniform]
        body = []
        for name in others:
            rows = comparison.savings(uniform, by_curve[name], metric)
            smallest, largest = by_curve[name][0][0], by_curve[name][-1][0]
            body.append([name] + [savings_cell(r, smallest, largest) for r in rows])
            records += [{"model": model, "task": task, "metric": metric, "allocator": name, **r} for r in rows]
        blocks.append((f"{model} {task} {metric}", header, body))
    if fmt == "csv":
        import csv
        import io

        out = io.StringIO()
        fields = ["model", "task", "metric", "allocator", "uniform_params", "target", "params", "ratio", "ratio_low",
                  "ratio_high"]
        writer = csv.DictWriter(out, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return out.getvalue()
    legend = ("Parameter savings at equal quality: the adapter parameters each allocator needs to reach uniform's "
              "mean metric at each of uniform's budgets (interpolated on log parameters between the allocator's "
              "budgets), as a ratio to uniform's (below 1: fewer parameters), with a 95% percentile bootstrap "
              "interval over seeds (2,000 resamples); <= x: already reached at the allocator's smallest budget; "
              "not reached: not within its largest.")
    lines = []
    for title, header, body in blocks:
        if fmt == "latex":
            lines += [f"% {title}", r"\begin{tabular}{" + "l" * len(header) + "}",
                      " & ".join(map(latex_escape, header)) + r" \\",
                      *[" & ".join(map(latex_escape, r)) + r" \\" for r in body], r"\end{tabular}"]
        else:
            lines += [f"Savings, {title}:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(r) + " |" for r in body], ""]
    if not blocks:
        lines.append("No savings table: it needs uniform at two or more budgets and another allocator.")
    lines.append(("% " if fmt == "latex" else "") + legend)
    return "\n".join(lines) + "\n"


def savings_cell(r: dict, smallest: float, largest: float) -> str:
    def ratio(value):
        if value == comparison.BELOW_SWEEP:
            return f"≤{smallest / r['uniform_params']:.2f}"
        return "not reached" if math.isinf(value) else f"{value:.2f}"

    if r["params"] == comparison.BELOW_SWEEP:
        head = f"≤ {smallest:,.0f} (≤{smallest / r['uniform_params']:.2f}x)"
    elif math.isinf(r["params"]):
        head = f"not reached by {largest:,.0f}"
    else:
        head = f"{r['params']:,.0f} ({r['ratio']:.2f}x)"
    return f"{head} [{ratio(r['ratio_low'])}, {ratio(r['ratio_high'])}]"


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


# --- rendering

def latex_escape(s: str) -> str:
    return s.replace("_", r"\_").replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("~", r"$\sim$").replace(
        "—", "--").replace("≤", r"$\le$")


def format_cell(c: dict) -> str:
    text = f"{c['mean']:.2f}" + (f" ± {c['std']:.2f}" if c["n"] > 1 else "") + f" (n={c['n']})"
    if c["paper"] is not None:
        text += f" [{'~' if c['paper_is_analogue'] else ''}{c['paper']:.2f}, {c['diff_paper']:+.2f}]"
    if c["vs_uniform"] is not None:
        p = c["p_vs_uniform"]
        mark = "" if p is None else f" p={p:.2f}" if p >= 0.01 else f" p={p:.1g}"  # 0.005, not 0.00
        mark += "*" if p is not None and p < 0.05 else ""
        text += f" Δu {c['vs_uniform']:+.2f}{mark}"
    return text


def table_rows(cells: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The paper's layout: a row per (model, method), a column per task metric (and budget), memory last."""
    columns = sorted({c["column"] for c in cells}, key=column_sort_key)
    by_key = {(c["model"], c["row"], c["column"]): c for c in cells}
    rows = sorted({(c["model"], c["row"]) for c in cells}, key=lambda mr: (mr[0], row_sort_key(mr[1])))
    header = ["model", "method"] + [" ".join(col) for col in columns] + [
        "scale", "adapter MiB", "paper Mem", "optimizer MiB", "peak MiB", "step s", "eff. rank"]
    body = []
    def across(here, key, fmt):
        """One value if the row's cells agree, else each column's in order (budgets as columns differ)."""
        values = list(dict.fromkeys("—" if c[key] is None else format(c[key], fmt) for c in here if c))
        return " / ".join(values)

    for model, row in rows:
        here = [by_key.get((model, row, col)) for col in columns]
        body.append([model, row] + [format_cell(c) if c else "—" for c in here] + [
            across(here, "scale", "s"), across(here, "adapter_mib", ".2f"), across(here, "paper_memory", "g"),
            across(here, "optimizer_mib", ".1f"), across(here, "peak_mib", ".0f"),
            across(here, "step_seconds", ".3f"), across(here, "effective_rank", ".2f")])
    return header, body


CSV_FIELDS = ["model", "row", "task", "metric", "budget", "n", "mean", "std", "paper", "paper_is_analogue",
              "diff_paper", "vs_uniform", "p_vs_uniform", "scale", "adapter_params", "adapter_mib", "paper_memory",
              "optimizer_mib", "peak_mib", "step_seconds", "effective_rank", "tuned"]


def render(cells: list[dict], fmt: str, missing: list[str], paper: str, protocol: str = "",
           search: list[str] = (), checks: list[str] = ()) -> str:
    # checks: lines above the table (does the budget bind? were the runs made alike?)
    if fmt == "csv":
        import csv
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for c in sorted(cells, key=lambda c: (c["model"], row_sort_key(c["row"]), c["task"], c["metric"])):
            writer.writerow(c)
        return out.getvalue()
    header, body = table_rows(cells)
    source = paper_tables.PAPER_NAMES[paper]
    legend = (f"Cells: mean ± sample std over seeds (n) in the paper's units; [{source}'s number, ours minus "
              f"it] where the paper has the cell (~: the number of the model and task this CPU stand-in replaces); "
              f"Δu: difference from uniform LoRA at the same budget, p: Welch's t-test over seeds, "
              f"*: p < 0.05 (beyond seed noise). scale: the update scale policy (matched: every layer at uniform's "
              f"alpha / r_u; per_layer: alpha / r_i, also every run from before the policy existed; rslora). "
              f"adapter MiB: fp32 adapter tensors (full FT: the whole model). "
              f"a / b in the last columns: the value in each metric column, left to right, where they differ.")
    if fmt == "markdown":
        lines = ([protocol, ""] if protocol else []) + ([*checks, ""] if checks else []) + [
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines + ["", legend, *search] + (["", *missing] if missing else [])) + "\n"
    if fmt == "latex":
        lines = ([f"% {protocol}"] if protocol else []) + [f"% {line}" for line in checks] + [
                 r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule",
                 " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(latex_escape(x) for x in r) + r" \\" for r in body]
        lines += [r"\bottomrule", r"\end{tabular}", "% " + legend]
        return "\n".join(lines + ["% " + line for line in search if line] + ["% " + m for m in missing]) + "\n"
    raise LoramboError(f"unknown --format '{fmt}'; use markdown, latex or csv")


# --- plots

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lorambo-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders or sweep folders")
    parser.add_argument("--format", default="markdown", choices=["markdown", "latex", "csv"])
    parser.add_argument("--paper", default="auto", choices=["auto", "000", "003", "adalora"],
                        help="whose numbers go beside the cells (auto: 003 when GaLore/AdaRankGrad runs are there, "
                             "adalora for DeBERTa-v3, else 000)")
    parser.add_argument("--out", help="folder for the report file and plots (default: the first path)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--savings", action="store_true",
                        help="also the parameters each allocator needs to reach uniform's metric at each budget "
                             "(savings.{md,tex,csv} and savings_*.png)")
    args = parser.parse_args(argv)
    try:
        runs, missing = find_runs(args.paths)
        if not runs:
            raise LoramboError(f"no finished runs (metrics.json) under {', '.join(args.paths)}")
        paper = args.paper if args.paper != "auto" else (
            "003" if any(m["optimizer"] in ("galore", "adarankgrad") for m in runs) else
            "adalora" if any(m["model"].endswith("deberta_v3") for m in runs) else "000")
        tuned = tuning_records(args.paths)
        mark_tuned(runs, tuned)
        cells = build_cells(runs, paper)
        curves = comparison.sweep_curves(runs)
        text = render(cells, args.format, missing, paper, protocol_line(runs, tuned), search_table(tuned),
                      capacity_lines(runs, curves) + environment_lines(runs))
        out_dir = args.out or (args.paths[0] if os.path.isdir(args.paths[0]) else ".")
        os.makedirs(out_dir, exist_ok=True)
        from lorambo.results import write_text_atomic

        suffix = {"markdown": "md", "latex": "tex", "csv": "csv"}[args.format]
        write_text_atomic(os.path.join(out_dir, "report." + suffix), text)
        plots = [] if args.no_plots else plot_all(cells, out_dir)
        if args.savings:
            saved = savings_tables(curves, args.format)
            write_text_atomic(os.path.join(out_dir, "savings." + suffix), saved)
            text += "" if args.format == "csv" else "\n" + saved  # stdout stays one CSV table
            plots += [] if args.no_plots else savings_plots(curves, out_dir)
    except LoramboError as e:
        print(f"lorambo-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(text)
    if args.format != "csv":
        print(f"\n{len(runs)} runs; report and {len(plots)} plots in {out_dir}")


if __name__ == "__main__":
    main()
