"""Checkpoints every `train.checkpoint_every` steps, and `resume=RUN_DIR` continuing from the last one.

A checkpoint holds everything the next step depends on: the trainable tensors (and the ranks they have, after
online growth), optimizer and scheduler state, the method's own state (growth, ARD-LoRA scales, AdaLoRA's
importance scores), the step and the position in the epoch, timings so far, and every RNG. One file per run
(`checkpoint.pt`, replaced atomically) plus one RNG file per process and checkpoint step: a run killed between
writing step 20's RNG and step 20's checkpoint.pt resumes from step 10 with step 10's RNG, not step 20's.

Both are read with `torch.load(weights_only=True)`: tensors and plain containers only, so a planted file cannot
run code on `resume=` (a full unpickler would call whatever `__reduce__` names). numpy's RNG state is stored as
a tensor for that reason.
"""

import json
import os
import pickle
import random

import numpy as np
import torch
from omegaconf import OmegaConf

from lorambo.errors import LoramboError
from lorambo.results import read_jsonl, write_atomic, write_json_atomic, write_text_atomic

CHECKPOINT = "checkpoint.pt"
CONFIG = "checkpoint_config.json"  # the run's resolved config, small: resume reads it without the tensors


def rng_path(run_dir: str, rank: int, step: int) -> str:
    return os.path.join(run_dir, f"checkpoint_rng_{rank}_step{step}.pt")


def stale_rng_files(run_dir: str, step: int) -> list[str]:
    """RNG files of checkpoints before `step` (and of the older unstamped layout)."""
    return [os.path.join(run_dir, name) for name in os.listdir(run_dir)
            if name.startswith("checkpoint_rng_") and not name.endswith(f"_step{step}.pt")]


def save_atomic(obj, path: str) -> None:
    write_atomic(path, lambda f: torch.save(obj, f), binary=True)


def capture_rng() -> dict:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                        has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str, state: dict, config: dict, accelerator) -> None:
    """Each process writes its RNG for this step first, then (after all have) the main process the config and
    the shared state, and only then removes the previous step's RNG files: a checkpoint.pt on disk always has
    the RNG files of its own step beside it, wherever the run is killed."""
    save_atomic(capture_rng(), rng_path(run_dir, accelerator.process_index, state["step"]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(os.path.join(run_dir, CONFIG), config)
        save_atomic(state, os.path.join(run_dir, CHECKPOINT))
        for path in stale_rng_files(run_dir, state["step"]):
            os.remove(path)


def saved_step(run_dir: str) -> int | None:
    """The step of the checkpoint in `run_dir`, if any: its RNG file's (a newer step's RNG file may be there
    beside it only if the run was killed before that step's checkpoint.pt replaced this one)."""
    if not os.path.exists(os.path.join(run_dir, CHECKPOINT)):
        return None
    steps = [int(name.rsplit("_step", 1)[1][:-3]) for name in os.listdir(run_dir)
             if name.startswith("checkpoint_rng_0_step") and name.endswith(".pt")]
    return min(steps) if steps else None


def checkpoint_file(run_dir: str) -> str:
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        raise LoramboError(f"no checkpoint in '{run_dir}'; resume= needs a run folder that was started with "
                           f"train.checkpoint_every > 0 and has not finished")
    return path


def safe_load(path: str):
    """Tensors and plain containers only; anything else (code a pickle would run) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LoramboError(f"'{path}' holds more than tensors and plain data, so it was not loaded (it could run "
                           f"code); resume only checkpoints lorambo wrote ({str(e).splitlines()[0][:120]})")
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # cut short (a full disk) or overwritten
        raise LoramboError(f"'{path}' is damaged and cannot be read ({str(e).splitlines()[0][:100]}); the run "
                           f"cannot continue from it: start it again")


def load(run_dir: str, process_index: int) -> tuple[dict, dict]:
    state = safe_load(checkpoint_file(run_dir))
    if "progress" not in state or "method" not in state:
        raise LoramboError(f"the checkpoint in '{run_dir}' was written by an older lorambo (before methods were "
                           f"plug-ins) and cannot be continued; start the run again")
    rng_file = rng_path(run_dir, process_index, state["step"])
    legacy = os.path.join(run_dir, f"checkpoint_rng_{process_index}.pt")  # written before the files had steps
    if not os.path.exists(rng_file) and os.path.exists(legacy):
        rng_file = legacy
    if not os.path.exists(rng_file):
        raise LoramboError(f"checkpoint in '{run_dir}' has no RNG state for process {process_index}; "
                           f"resume with the number of processes the run had")
    return state, safe_load(rng_file)


def remove(run_dir: str) -> None:
    for name in os.listdir(run_dir):
        if name in (CHECKPOINT, CONFIG) or name.startswith("checkpoint_rng_"):
            os.remove(os.path.join(run_dir, name))


def resume_config(run_dir: str):
    """The config a run to be resumed was started with (saved in its checkpoint), pointing at that run."""
    checkpoint_file(run_dir)
    try:
        with open(os.path.join(run_dir, CONFIG)) as f:
            cfg = OmegaConf.create(json.load(f))
    except (OSError, ValueError) as e:
        raise LoramboError(f"'{os.path.join(run_dir, CONFIG)}' is missing or damaged ({str(e)[:80]}); the run "
                           f"cannot continue without its config: start it again") from None
    cfg.resume = run_dir
    return cfg


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the records a killed run wrote after its last checkpoint (they will be written again)."""
    if not os.path.exists(path):
        return
    keep = [record for record in read_jsonl(path) if record["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in keep))


def continue_from(resumed: dict, rng: dict, optimizer, scheduler, run_dir: str, main: bool) -> dict:
    """A checkpoint's optimizer, schedule and RNG back in place, the logs cut back to its step; returns where
    the loop was (train.Progress's fields)."""
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    if main:  # what a killed run logged after its checkpoint is logged again
        for name in ("metrics_log.jsonl", "rank_history.jsonl"):
            truncate_jsonl(os.path.join(run_dir, name), resumed["step"])
    restore_rng(rng)
    return resumed["progress"]
