"""Mean and spread over seeds of finished runs, by allocator and budget: the comparison table of issue 3.

    .venv/bin/python bench/allocator_comparison.py SWEEP_DIR [SWEEP_DIR ...]

Reads every metrics.json below the given folders (a Hydra sweep's folders), groups by (allocator, budget
choice), and prints a markdown table: accuracy mean and sample std over seeds, the difference from uniform at
the matched budget, adapter parameters, and sensitivity estimation time in seconds and in percent of the run.
Folders with an error.txt and no metrics.json are listed as failed.
"""

import glob
import json
import os
import statistics
import sys

import yaml


def budget_choice(run_dir: str) -> str:
    with open(os.path.join(run_dir, ".hydra", "hydra.yaml")) as f:
        return yaml.safe_load(f)["hydra"]["runtime"]["choices"]["budget"]


def main(folders: list[str]) -> None:
    groups, failed = {}, []
    for folder in folders:
        for run_dir in sorted(glob.glob(os.path.join(folder, "*", ""))):
            path = os.path.join(run_dir, "metrics.json")
            if not os.path.exists(path):
                failed.append(run_dir)
                continue
            with open(path) as f:
                m = json.load(f)
            groups.setdefault((m["allocator"], budget_choice(run_dir)), []).append(m)
    baseline = [m["accuracy"] for (a, b), runs in groups.items() if a == "uniform" for m in runs]
    base_mean = statistics.mean(baseline) if baseline else float("nan")
    print("| allocator | budget | seeds | accuracy mean | std | vs uniform | adapter params | "
          "sensitivity s | sensitivity % of run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (allocator, budget), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != "uniform", kv[0])):
        acc = [m["accuracy"] for m in runs]
        sens = [m["sensitivity_seconds"] for m in runs]
        share = [100 * m["sensitivity_seconds"] / m["total_seconds"] for m in runs]
        params = sorted({m["adapter_params"] for m in runs})
        print(f"| {allocator} | {budget} | {len(runs)} | {statistics.mean(acc):.4f} | "
              f"{statistics.stdev(acc) if len(acc) > 1 else float('nan'):.4f} | "
              f"{statistics.mean(acc) - base_mean:+.4f} | {', '.join(f'{p:,}' for p in params)} | "
              f"{statistics.mean(sens):.1f} | {statistics.mean(share):.1f} |")
    for run_dir in failed:
        print(f"failed or missing: {run_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
