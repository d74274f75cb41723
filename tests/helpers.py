import os
import subprocess
import sys

import lorambo  # noqa: F401
from lorambo.config import compose_config as compose_cfg  # noqa: F401  (re-exported for the tests)


def run_in_process(overrides, run_dir):
    """A run through the same `run` the CLI calls, without a subprocess (faster)."""
    from lorambo.train import run

    os.makedirs(run_dir, exist_ok=True)
    return run(compose_cfg(["logger=none", *overrides]), str(run_dir))


def run_cli(args, cwd, timeout=600, env=None, program="lorambo-run"):
    """`lorambo-run ARGS` (or another of lorambo's commands) as a user runs it, from `cwd` (with `env`, a
    changed environment)."""
    exe = os.path.join(os.path.dirname(sys.executable), program)
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def run_main(args, cwd, monkeypatch, capfd, program="lorambo-run"):
    """(exit code, stdout, stderr) of `lorambo-run ARGS` (or `lorambo-allocate`) in `cwd`, through the function
    the script calls, in this process (a subprocess per case costs seconds of interpreter and torch start-up)."""
    from lorambo.cli import allocate_main, main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [program, *args])
    code = 0
    try:
        {"lorambo-run": main, "lorambo-allocate": allocate_main}[program]()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


def write_csv_splits(folder, header, make_row, sizes: dict, seed: int = 0):
    """A local copy of a hub dataset (what task.dataset.path reads): one CSV per split, each row from
    make_row(rng), `sizes` rows per split."""
    import csv
    import random

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for split, n in sizes.items():
        with open(os.path.join(folder, f"{split}.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for _ in range(n):
                writer.writerow(make_row(rng))
    return folder
