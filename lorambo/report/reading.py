"""Reading run folders: finished runs, damaged metrics files, a sweep's missing cells, tuning records."""

import glob
import json
import os

import yaml

from lorambo.errors import LoramboError


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
