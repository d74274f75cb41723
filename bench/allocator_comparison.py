"""Mean and spread over seeds of finished runs, by method and budget (the comparison tables of issues 3 and 4).

    .venv/bin/python bench/allocator_comparison.py SWEEP_DIR [SWEEP_DIR ...]

Reads every metrics.json below the given folders (Hydra sweep folders), groups by (allocator, optimizer, budget
choice), and prints a markdown table: accuracy mean and sample std over seeds, the difference from uniform,
adapter parameters and MiB, optimizer-state MiB, peak memory, median step time, and sensitivity estimation time
in seconds and in percent of the run. Folders with no metrics.json are listed as failed or missing.
"""

import glob
import json
import os
import statistics
import sys

import yaml


def choices(run_dir: str) -> dict:
    with open(os.path.join(run_dir, ".hydra", "hydra.yaml")) as f:
        return yaml.safe_load(f)["hydra"]["runtime"]["choices"]


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
            c = choices(run_dir)
            budget = "-" if m["allocator"] == "full_ft" else c["budget"]
            groups.setdefault((m["allocator"], c.get("optimizer", "adamw"), budget), []).append(m)
    baseline = [m["accuracy"] for (a, o, b), runs in groups.items() if a == "uniform" and o == "adamw" for m in runs]
    base_mean = statistics.mean(baseline) if baseline else float("nan")
    mib = lambda x: x / 2**20
    print("| allocator | optimizer | budget | seeds | accuracy mean | std | vs uniform | adapter params | adapter MiB "
          "| optimizer state MiB | peak RSS MiB | step s | sensitivity s | sensitivity % of run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = lambda kv: (kv[0][2], kv[0][0] != "uniform", kv[0])
    for (allocator, optimizer, budget), runs in sorted(groups.items(), key=order):
        acc = [m["accuracy"] for m in runs]
        mean = lambda key: statistics.mean(m.get(key, 0) for m in runs)
        share = statistics.mean(100 * m.get("sensitivity_seconds", 0) / m["total_seconds"] for m in runs)
        params = sorted({m["adapter_params"] for m in runs})
        print(f"| {allocator} | {optimizer} | {budget} | {len(runs)} | {statistics.mean(acc):.4f} | "
              f"{statistics.stdev(acc) if len(acc) > 1 else float('nan'):.4f} | "
              f"{statistics.mean(acc) - base_mean:+.4f} | {', '.join(f'{p:,}' for p in params)} | "
              f"{mib(mean('adapter_bytes')):.2f} | {mib(mean('optimizer_state_bytes')):.1f} | "
              f"{mib(mean('peak_memory_bytes')):.0f} | {mean('step_seconds_median'):.3f} | "
              f"{mean('sensitivity_seconds'):.1f} | {share:.1f} |")
    for run_dir in failed:
        print(f"failed or missing: {run_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
