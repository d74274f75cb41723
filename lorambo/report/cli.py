"""`lorambo-report PATH...`: the papers' tables and the usual plots from run folders (never the network)."""

import argparse
import os
import sys

from lorambo.errors import LoramboError
from lorambo.report import comparison
from lorambo.report.cells import build_cells, capacity_lines
from lorambo.report.plots import plot_all, savings_plots
from lorambo.report.reading import find_runs, mark_tuned, tuning_records
from lorambo.report.render import (
    environment_lines,
    protocol_line,
    render,
    savings_tables,
    search_table,
)


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
