"""The tuned protocol (issue 16): every row of a table gets the same learning-rate search before it is compared.

For each cell of a sweep (its overrides without the seed: a row, a task, a budget), every point of a small grid
(the row's own learning rate times each of `lr_factors`, and for a row whose update scale follows `lora.scaling`
each scale policy) trains once, with `search_seed`, on the training split less a dev split carved from it
(`task.dev_fraction`), and is scored on that dev split. The best point per cell is then run over the sweep's
seeds and scored on the validation split, as an untuned sweep would be. `tuning.json` in the sweep folder holds
every point, its dev score and the choice, for `lorambo-report`.

Hydra's basic sweeper runs one grid and the Optuna sweeper optimises one objective over the whole space; neither
can pick a best point per cell and then run it over seeds, so TunedSweeper (hydra_plugins/) subclasses the basic
sweeper: its grid parsing and Hydra's launchers (local, joblib, submitit) run both stages."""

import json
import os

from lorambo.errors import LoramboError

LOWER_IS_BETTER = ("perplexity", "loss", "validation_loss", "forgetting", "general_loss")
TUNING_FILE = "tuning.json"


def grid_points(lr: float, lr_factors, scalings, has_scale_policy: bool) -> list[dict]:
    """The overrides of every grid point for one cell: its learning rate times each factor, crossed with the
    scale policies when the row has one."""
    lrs = [float(f"{lr * f:.3g}") for f in lr_factors]
    return [{"train.lr": x, **({"lora.scaling": s} if has_scale_policy else {})}
            for x in lrs for s in (scalings if has_scale_policy else [None])]


def dev_score(run_dir: str) -> tuple[str, float] | None:
    """(metric, value) of a finished search run, from its metrics.json (None if it failed)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        metrics = json.load(f)
    return metrics["main_metric"], metrics[metrics["main_metric"]]


def best_point(scored: list[dict]) -> dict | None:
    """The grid point with the best dev score (the first among equals); None if no point finished."""
    done = [s for s in scored if s["dev_score"] is not None]
    if not done:
        return None
    sign = -1 if done[0]["metric"] in LOWER_IS_BETTER else 1
    return max(done, key=lambda s: sign * s["dev_score"])


def read_tuning(sweep_dir: str) -> dict | None:
    path = os.path.join(sweep_dir, TUNING_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        raise LoramboError(f"{path} is damaged; rerun the tuned sweep (or delete the file to report untuned)")
