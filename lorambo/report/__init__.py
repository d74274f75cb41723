"""`lorambo-report PATH...`: the papers' tables and the usual plots from run folders (never the network).

Reads every metrics.json below the given folders; groups runs into cells (model, table row, task column) and
prints mean +- sample std over seeds, the paper's number beside it where one exists (for the CPU stand-ins,
the number of the model and task they stand for), the difference, and each row's difference from uniform LoRA
with Welch's t-test over seeds (significant: p < 0.05). Sweeps (folders with Hydra's multirun.yaml) also
report the cells that have no result. Writes report.{md,tex,csv} and PNG plots into --out.

Split by concern: reading (run folders), cells (grouping and statistics), comparison (budget curves, savings),
paper_tables (the papers' numbers), render (markdown, LaTeX, CSV), plots, cli (the command line).
"""

from lorambo.report.cli import main  # noqa: F401  (the lorambo-report script: lorambo.report:main)
