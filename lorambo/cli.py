"""`lorambo-run` and `lorambo-allocate`: thin @hydra.main shims around lorambo.train.run and
lorambo.allocate.write_allocation_for_peft."""

import fcntl
import json
import os
import sys
import traceback
from contextlib import contextmanager
from difflib import get_close_matches

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import lorambo  # noqa: F401  (torchvision fix before anything imports it)
from lorambo.config import CONF_DIR
from lorambo.errors import LoramboError
from lorambo.stopping import RunStopped, exit_code, stoppable

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


# what a run writes as its outcome: cleared before a new run writes into the folder, so no stale result stays
OUTCOME_FILES = ("metrics.json", "error.txt", "metrics_log.jsonl", "rank_history.jsonl", "allocation.json",
                 "sensitivities.json", "labels.json", "adapter_config.json")


@contextmanager
def run_folder(run_dir: str, resuming: bool):
    """One writer per run folder (an advisory lock, released when the process ends however it ends); a new run
    starts from a folder without a previous outcome (a resumed one keeps its own). The processes of one
    multi-process run share the folder: the main process holds the lock for them (if it is refused, it fails
    and the launcher stops the others)."""
    os.makedirs(run_dir, exist_ok=True)
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with open(os.path.join(run_dir, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LoramboError(f"another lorambo-run is writing into '{run_dir}'; wait for it, or give this run "
                               f"its own folder (hydra.run.dir=...)") from None
        for name in OUTCOME_FILES if not resuming else ("error.txt",):  # a resumed run keeps its own log
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
        yield


def finished_metrics(run_dir: str, cfg) -> dict | None:
    """The metrics of a finished run in `run_dir` whose resolved config is `cfg`'s (skip_finished aside), else None."""
    metrics_path, config_path = (os.path.join(run_dir, n) for n in ("metrics.json", "config_resolved.yaml"))
    if not (os.path.exists(metrics_path) and os.path.exists(config_path)):
        return None
    same = lambda c: {k: v for k, v in c.items() if k != "skip_finished"}
    try:
        if same(OmegaConf.to_container(OmegaConf.load(config_path))) != same(OmegaConf.to_container(cfg,
                                                                                                   resolve=True)):
            return None
        with open(metrics_path) as f:
            metrics = json.load(f)
    except Exception:  # noqa: BLE001  (a damaged or half-copied cell of any kind is run again)
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("main_metric") in metrics else None


def check_output_folders(argv: list[str]) -> None:
    """Hydra creates the run's (or the sweep's) folder: a file in its place would end in an OSError traceback."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and os.path.exists(value) and not os.path.isdir(value):
            raise LoramboError(f"{key}='{value}' is a file; give the run a folder")


def check_resume_alone(argv: list[str]) -> None:
    """`resume=DIR` continues a run with the config it was started with: another override would be ignored."""
    if not any(a.startswith("resume=") and a != "resume=null" for a in argv):
        return
    others = [a for a in argv if not a.startswith(("resume=", "hydra.", "--")) and a != "-m"]
    if others:
        raise LoramboError(f"resume= continues a run with its own config, so {' '.join(others)} would be ignored; "
                           f"drop it (or start a new run with it)")


def program() -> str:
    name = os.path.basename(sys.argv[0])
    return name if name.startswith("lorambo-") else "lorambo-run"


def fail(message: str) -> None:
    print(f"{program()}: error: {message}", file=sys.stderr)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    import datasets
    import transformers

    from lorambo.results import write_text_atomic
    from lorambo.train import run

    datasets.disable_progress_bars()  # one progress bar: training's
    transformers.logging.set_verbosity_error()
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        if cfg.get("resume"):  # the killed run's own config, continued in its own folder
            from lorambo.checkpoint import resume_config

            cfg = resume_config(cfg.resume)
            run_dir = cfg.resume
        finished = finished_metrics(run_dir, cfg) if cfg.get("skip_finished") else None
        if finished:
            print(f"finished before, not run again (skip_finished): {run_dir}")
            return finished[finished["main_metric"]]
        with run_folder(run_dir, resuming=bool(cfg.get("resume"))), stoppable():
            try:
                metrics = run(cfg, run_dir)
            except (KeyboardInterrupt, RunStopped) as e:  # the user's or the cluster's stop: no result, a line
                stop = e if isinstance(e, RunStopped) else RunStopped("Ctrl-C")
                message = stopped_line(stop, run_dir)
                write_text_atomic(os.path.join(run_dir, "error.txt"), message + "\n")
                fail(message)
                raise SystemExit(exit_code(stop.how)) from None  # a sweep stops too
            except (LoramboError, OmegaConfBaseException) as e:
                message = one_line(e)
                write_text_atomic(os.path.join(run_dir, "error.txt"), message + "\n")
                raise LoramboError(message) from None
            except Exception as e:  # a bug: reported with its traceback; the run folder says it failed
                write_text_atomic(os.path.join(run_dir, "error.txt"), f"{type(e).__name__}: {e}\n")
                if HydraConfig.get().mode != RunMode.MULTIRUN:
                    raise
                traceback.print_exc()  # in a sweep the other jobs still run; lorambo-report lists it as failed
                _failures.append(run_dir)
                return None
    except LoramboError as e:  # before the folder was ours (a busy folder, a damaged resume) nothing is written
        fail(str(e))
        _failures.append(run_dir)
        return None
    main_metric = metrics["main_metric"]  # on a dev split (task.dev_fraction): its plain name
    if int(os.environ.get("RANK", "0")) != 0:  # multi-process: the main process reports
        return metrics[main_metric]
    print(f"{main_metric}={metrics[main_metric]:.4f} adapter_params={metrics['adapter_params']:,} "
          f"train_seconds={metrics['train_seconds']:.1f}")
    print(f"results: {os.path.join(run_dir, 'metrics.json')}")
    return metrics[main_metric]


def stopped_line(stop, run_dir: str) -> str:
    from lorambo.checkpoint import saved_step

    where = f"at step {stop.step} of {stop.steps}" if stop.step is not None else "before training ended"
    saved = saved_step(run_dir)
    then = (f"the checkpoint of step {saved} is saved: continue with lorambo-run resume={run_dir}" if saved
            else "no checkpoint was saved (train.checkpoint_every=N saves one every N steps): run it again")
    return f"stopped by {stop.how} {where}; no result written; {then}"


def one_line(e: Exception) -> str:
    if not isinstance(e, OmegaConfBaseException):
        return str(e)
    line = str(e.__cause__ or e).splitlines()[0]
    key = getattr(e, "full_key", None)  # which key's value failed (an interpolation, a type)
    return f"{key}: {line}" if key and key not in line else line


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _allocate_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    import datasets
    import transformers

    from lorambo.allocate import write_allocation_for_peft

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        with run_folder(out_dir, resuming=False):
            allocation = write_allocation_for_peft(cfg, out_dir)
    except (LoramboError, OmegaConfBaseException) as e:
        fail(one_line(e))
        _failures.append(out_dir)
        return
    print(f"adapter_params={allocation['adapter_params']:,} p_max={allocation['p_max']:,} "
          f"layers={len(allocation['ranks'])}")
    print(f"PEFT config: {os.path.join(out_dir, 'adapter_config.json')} (start: {allocation['peft_start']})")


def check_new_task_keys(argv: list[str]) -> None:
    """`+task.KEY=...` adds a key, and a task's sources read different keys, so the task section takes any key:
    refuse one that no task config and no task reader knows (a misspelling would be ignored in silence)."""
    from lorambo.schema import Task

    dirs = config_dirs(argv)
    known = set(Task.model_fields)
    for root in dirs:
        folder = os.path.join(root, "task")
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if name.endswith(".yaml"):
                known |= set(OmegaConf.load(os.path.join(folder, name)) or {}) - {"defaults"}
    for arg in argv:
        key = arg.partition("=")[0]
        if not key.startswith("+") or not key.lstrip("+").startswith("task."):
            continue
        name = key.lstrip("+").split(".")[1]
        if name not in known:
            near = get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean task.{near[0]}?" if near else f"the task keys are: {', '.join(sorted(known))}"
            raise LoramboError(f"unknown key task.{name}; {hint}")


def hydra_error_line(e: Exception) -> str:
    """Hydra's composition errors (an unknown key, an override it cannot parse, a missing config) in one line."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = e.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and "not in struct" in str(cause):
        key = cause.full_key
        section, _, name = key.rpartition(".")
        keys = sorted(str(k) for k in cause.parent_node.keys()) if cause.parent_node is not None else []
        near = get_close_matches(name, keys, n=1)
        where = f"{section}." if section else ""
        hint = (f"did you mean {where}{near[0]}?" if near
                else f"{section or 'the config'} has: {', '.join(keys)}" if keys else "")
        return f"unknown key {key}; {hint} (to add a new key: +{key}=...)".replace("; (", " (")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, OverrideParseException):
        reason = lines[1].split(" expecting ")[0] if len(lines) > 1 else ""
        return (f"could not read the override {lines[0].removeprefix('Error parsing override ')} ({reason}); "
                f"quote a value with brackets, parentheses, commas or spaces whole: 'key=\"value\"'")
    if isinstance(e, MissingConfigException):
        options = [line for line in lines[1:] if not line.startswith(("Available", "_"))]
        return lines[0] + (f"; choose one of: {', '.join(options)}" if options else "")
    message = lines[0] if lines else type(e).__name__
    if cause is not None and str(cause).strip():
        message += ": " + str(cause).strip().splitlines()[0]
    return message


def error_line(e: Exception) -> str:
    """The one line for an error in composing or checking a config, whoever raised it."""
    from hydra.errors import HydraException

    if isinstance(e, HydraException):
        return hydra_error_line(e)
    return one_line(e)


def entry(hydra_main) -> None:
    from hydra.errors import HydraException

    _failures.clear()
    try:
        check_group_choices(sys.argv[1:])
        check_resume_alone(sys.argv[1:])
        check_new_task_keys(sys.argv[1:])
        check_output_folders(sys.argv[1:])
    except LoramboError as e:
        fail(str(e))
        sys.exit(2)
    full_error = os.environ.get("HYDRA_FULL_ERROR")  # the user asked for Hydra's own traceback
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its composition errors instead of printing them
    try:
        with stoppable():
            hydra_main()
    except (HydraException, OmegaConfBaseException, LoramboError) as e:
        if full_error == "1":
            raise
        fail(error_line(e))
        sys.exit(2)
    except (KeyboardInterrupt, RunStopped) as e:  # before a run had its folder: nothing of it to say
        how = e.how if isinstance(e, RunStopped) else "Ctrl-C"
        fail(f"stopped by {how} before a run started; nothing written")
        sys.exit(exit_code(how))
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    if _failures:
        sys.exit(1)


def main() -> None:
    entry(_main)


def allocate_main() -> None:
    entry(_allocate_main)


if __name__ == "__main__":
    main()
