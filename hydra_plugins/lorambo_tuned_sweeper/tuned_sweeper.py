"""`hydra/sweeper=tuned`: lorambo's tuned protocol (lorambo/tuning.py) as a Hydra sweeper. Hydra loads sweepers
only from the `hydra_plugins` package, so the class lives here; what it does is in lorambo.tuning."""

from collections import OrderedDict
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf


def cell_of(job: list[str]) -> tuple:
    """A job's cell: its overrides without the seed."""
    return tuple(o for o in job if not o.startswith("seed="))


class TunedSweeper(BasicSweeper):
    def __init__(self, max_batch_size=None, params=None, lr_factors=(1 / 3, 1.0, 3.0),
                 scalings=("matched", "per_layer"), dev_fraction: float = 0.1, search_seed: int = 0):
        super().__init__(max_batch_size, params)
        self.lr_factors, self.scalings = list(lr_factors), list(scalings)
        self.dev_fraction, self.search_seed = dev_fraction, search_seed

    def launch(self, jobs: list[list[str]]) -> list:
        returns = []
        for start in range(0, len(jobs), self.max_batch_size or max(1, len(jobs))):
            batch = jobs[start: start + (self.max_batch_size or len(jobs))]
            self.validate_batch_is_legal(batch)
            returns += list(self.launcher.launch(batch, initial_job_idx=start))
        return returns

    def sweep(self, arguments):
        from lorambo.methods import METHODS, import_builtin
        from lorambo.results import write_json_atomic
        from lorambo.tuning import TUNING_FILE, best_point, dev_score, grid_points

        import_builtin("lorambo.methods")
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = self.split_arguments(parser.parse_overrides(self._parse_config() + list(arguments)), None)[0]
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        cells = OrderedDict((cell_of(job), None) for job in jobs)
        search, owners = [], []
        for cell in cells:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(cell))
            method = METHODS.get(cfg.method.name)
            for point in grid_points(cfg.train.lr, self.lr_factors, self.scalings,
                                     bool(method and method.has_scale_policy)):
                search.append([*cell, *(f"{k}={v}" for k, v in point.items()), f"seed={self.search_seed}",
                               f"++task.dev_fraction={self.dev_fraction}",
                               "hydra.sweep.subdir=search/${hydra.job.num}_${task.name}_${method.name}_"
                               "${allocator.name}_${hydra:runtime.choices.budget}_lr${train.lr}_${lora.scaling}"])
                owners.append((cell, point))
        results = self.launch(search)
        record = {"lr_factors": self.lr_factors, "scalings": self.scalings, "dev_fraction": self.dev_fraction,
                  "search_seed": self.search_seed, "cells": []}
        for cell in cells:
            scored = []
            for (owner, point), result in zip(owners, results):
                if owner == cell:
                    score = dev_score(result.hydra_cfg.hydra.runtime.output_dir)
                    scored.append({"point": point, "metric": score and score[0],
                                   "dev_score": score and score[1]})
            best = best_point(scored)
            record["cells"].append({"overrides": list(cell), "grid": scored, "chosen": best and best["point"],
                                    "dev_score": best and best["dev_score"]})
            cells[cell] = best
        write_json_atomic(str(sweep_dir / TUNING_FILE), record)
        # the seeds, in the basic sweeper's order and under its job numbers (the report finds gaps as in an
        # untuned sweep); a cell whose whole search failed is left out, so the report lists it as missing
        subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)["subdir"]
        final = []
        for num, job in enumerate(jobs):
            best = cells[cell_of(job)]
            if best is not None:
                final.append([*job, *(f"{k}={v}" for k, v in best["point"].items()),
                              "hydra.sweep.subdir=" + subdir.replace("${hydra.job.num}", str(num))])
        return self.launch(final)
