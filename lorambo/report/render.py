"""The cells as markdown, LaTeX or CSV tables, with the protocol line, the search table and the savings tables."""

import collections
import math
import statistics

from lorambo.errors import LoramboError
from lorambo.report import comparison, paper_tables
from lorambo.report.cells import column_sort_key, row_key, row_sort_key, value_text


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
