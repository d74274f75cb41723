"""`lorambo-run`: a thin @hydra.main shim around lorambo.train.run."""

import os
import sys
import traceback

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import lorambo  # noqa: F401  (torchvision fix before anything imports it)
from lorambo.config import CONF_DIR
from lorambo.errors import LoramboError

_failures = []
# names that were allocators before the way of training became its own config group
MOVED_TO_METHOD = {"allocator": ("adalora", "ard_lora", "dora", "full_ft")}


def config_dirs(argv: list[str]) -> list[str]:
    """lorambo's configs and the folders a `hydra.searchpath=[file://DIR,...]` adds (a plug-in's yaml)."""
    dirs = [CONF_DIR]
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra.searchpath":
            dirs += [p.strip(" '\"")[len("file://"):] for p in value.strip("[]").split(",")
                     if p.strip(" '\"").startswith("file://")]
    return dirs


def config_groups(dirs: list[str]) -> list[str]:
    """The config groups: the folders that hold yaml files (hydra's own excepted)."""
    return sorted({d for root in dirs if os.path.isdir(root) for d in os.listdir(root)
                   if d != "hydra" and os.path.isdir(os.path.join(root, d))
                   and any(f.endswith(".yaml") for f in os.listdir(os.path.join(root, d)))})


def group_options(group: str, dirs: list[str] = (CONF_DIR,)) -> list[str]:
    folders = [os.path.join(root, group) for root in dirs if os.path.isdir(os.path.join(root, group))]
    return sorted({f[:-5] for folder in folders for f in os.listdir(folder)
                   if f.endswith(".yaml") and not f.startswith("_")})


def check_group_choices(argv: list[str]) -> None:
    """Hydra reports an unknown group option in a dozen lines; say it in one, with the choices."""
    dirs = config_dirs(argv)
    groups = config_groups(dirs)
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in groups or value in ("", "null"):
            continue
        choices = value.split(",") if not value.startswith(("glob(", "range(", "choice(")) else []
        for choice in choices:
            if choice in MOVED_TO_METHOD.get(key, ()):
                raise LoramboError(f"{choice} is a way of training, not an allocator: use method={choice}")
            if choice not in group_options(key, dirs):
                raise LoramboError(f"unknown {key} '{choice}'; choose one of: "
                                   f"{', '.join(group_options(key, dirs))}")


def fail(message: str) -> None:
    print(f"lorambo-run: error: {message}", file=sys.stderr)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    import datasets
    import transformers

    from lorambo.train import run

    datasets.disable_progress_bars()  # one progress bar: training's
    transformers.logging.set_verbosity_error()
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        if cfg.get("resume"):  # the killed run's own config, continued in its own folder
            from lorambo.checkpoint import resume_config

            cfg = resume_config(cfg.resume)
            run_dir = cfg.resume
        metrics = run(cfg, run_dir)
    except (LoramboError, OmegaConfBaseException) as e:
        message = str(e.__cause__ or e).splitlines()[0] if isinstance(e, OmegaConfBaseException) else str(e)
        with open(os.path.join(run_dir, "error.txt"), "w") as f:
            f.write(message + "\n")
        fail(message)
        _failures.append(run_dir)
        return None
    except Exception as e:  # a bug: reported with its traceback; the run folder says it failed
        with open(os.path.join(run_dir, "error.txt"), "w") as f:
            f.write(f"{type(e).__name__}: {e}\n")
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        traceback.print_exc()  # in a sweep the other jobs still run; lorambo-report lists this one as failed
        _failures.append(run_dir)
        return None
    main_metric = cfg.task.main_metric
    if int(os.environ.get("RANK", "0")) != 0:  # multi-process: the main process reports
        return metrics[main_metric]
    print(f"{main_metric}={metrics[main_metric]:.4f} adapter_params={metrics['adapter_params']:,} "
          f"train_seconds={metrics['train_seconds']:.1f}")
    print(f"results: {os.path.join(run_dir, 'metrics.json')}")
    return metrics[main_metric]


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
    except LoramboError as e:
        fail(str(e))
        sys.exit(2)
    _main()
    if _failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
