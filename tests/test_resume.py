"""Checkpoints and resume: a run continued from a checkpoint ends exactly as the uninterrupted run."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lorambo.checkpoint import resume_config
from lorambo.train import run
from tests.helpers import run_here, run_in_process

TINY = ["experiment=smoke", "task.max_train_samples=64", "task.max_eval_samples=32", "train.max_steps=10",
        "train.checkpoint_every=3", "train.keep_checkpoint=true", "train.log_every=1"]
METHODS = {
    "uniform": ["budget=r4"],
    "hessian_online": ["allocator=hessian_online", "method.grow_every=4", "method.growth_events=2"],
    "adarankgrad": ["method=full_ft", "optimizer=adarankgrad", "optimizer.min_gap=2", "optimizer.max_gap=4"],
    "ard_lora": ["method=ard_lora", "budget=r4"],
    "adalora": ["method=adalora", "budget=r4", "method.delta_t=2"],
    "dora": ["method=dora", "budget=r4"],
    "eva": ["allocator=eva", "budget=r4"],  # regression: their starts read statistics a checkpoint does not keep
    "gora": ["allocator=gora", "budget=r4"],
    "resnet_full_ft": ["model=tiny_resnet", "task=fashion_mnist", "method=full_ft"],
}


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics_log.jsonl")) as f:
        records = [(r["step"], r["train/loss"]) for r in map(json.loads, f) if "train/loss" in r]
    assert len(records) == len(dict(records))  # each step logged once
    return dict(records)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.slow
def test_resumed_run_ends_as_the_uninterrupted_one(method, tmp_path):
    """10 steps over 4-batch epochs, checkpoints at 3, 6, 9 (the last mid-epoch); resuming from step 9
    in a copy of the folder replays step 10 and the evaluation."""
    whole = tmp_path / "whole"
    expected = run_in_process([*TINY, *METHODS[method]], whole)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(whole, resumed_dir)
    os.remove(resumed_dir / "metrics.json")
    cfg = resume_config(str(resumed_dir))
    got = run(cfg, str(resumed_dir))
    assert got["resumed_from_step"] == 9 and got["steps"] == 10
    assert got["ranks"] == expected["ranks"]
    assert got[expected["main_metric"]] == pytest.approx(expected[expected["main_metric"]], abs=1e-6)
    assert got["adapter_params"] == expected["adapter_params"]
    assert losses(resumed_dir) == pytest.approx(losses(whole), abs=1e-6)
    assert not glob.glob(str(whole / "checkpoint*")) or os.path.exists(whole / "checkpoint.pt")


@pytest.mark.slow
def test_checkpoint_removed_when_the_run_completes(tmp_path):
    run_in_process([*TINY[:-2], "train.log_every=1"], tmp_path)
    assert not glob.glob(str(tmp_path / "checkpoint*"))


def cli(args, cwd, **kw):
    exe = os.path.join(os.path.dirname(sys.executable), "lorambo-run")
    return subprocess.Popen([exe, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_a_run_killed_by_a_signal_resumes_to_the_same_result(tmp_path, monkeypatch, capfd):
    args = ["experiment=smoke", "train.max_steps=120", "train.checkpoint_every=10", "allocator=hessian_online",
            "method.grow_every=30", "seed=3"]
    run_in_process(args, tmp_path / "whole")  # the uninterrupted run: no process of its own needed
    killed = cli([*args, "hydra.run.dir=killed"], tmp_path)
    deadline = time.time() + 300
    while not os.path.exists(tmp_path / "killed" / "checkpoint.pt") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a little past the checkpoint: the killed run has logged steps it will log again
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert not os.path.exists(tmp_path / "killed" / "metrics.json"), "the run finished before it was killed"
    resumed = run_here(["resume=killed"], tmp_path, monkeypatch, capfd)  # the command a user types, in process
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.load(open(tmp_path / "whole" / "metrics.json"))
    b = json.load(open(tmp_path / "killed" / "metrics.json"))
    assert b["resumed_from_step"] > 0
    assert b["ranks"] == a["ranks"] and b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)


@pytest.mark.slow
def test_a_run_killed_between_its_rng_and_its_checkpoint_resumes_from_the_last_whole_checkpoint(tmp_path,
                                                                                                 monkeypatch):
    """Regression: each process's RNG file was replaced before checkpoint.pt, so a run killed between the two
    writes of step 6 resumed from step 3's state with step 6's RNG (the CI failure of the killed-by-a-signal
    test: other dropout masks, other growth). Now the RNG files are stamped with their step."""
    from lorambo import checkpoint

    args = [*TINY, "allocator=hessian_online", "method.grow_every=4", "method.growth_events=2"]
    expected = run_in_process(args, tmp_path / "whole")

    class Killed(Exception):
        pass

    real_save_atomic, writes = checkpoint.save_atomic, []

    def killed_at_the_second_checkpoint(obj, path):
        if path.endswith("checkpoint.pt"):
            writes.append(path)
            if len(writes) == 2:
                raise Killed  # step 6's RNG is on disk, its checkpoint.pt is not
        real_save_atomic(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", killed_at_the_second_checkpoint)
    with pytest.raises(Killed):
        run_in_process(args, tmp_path / "killed")
    monkeypatch.setattr(checkpoint, "save_atomic", real_save_atomic)
    got = run(resume_config(str(tmp_path / "killed")), str(tmp_path / "killed"))
    assert got["resumed_from_step"] == 3
    assert got["ranks"] == expected["ranks"] and got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)


@pytest.mark.slow
def test_resume_without_a_checkpoint_is_one_line(tmp_path, monkeypatch, capfd):
    result = run_here([f"resume={tmp_path}"], tmp_path, monkeypatch, capfd)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "lorambo-run: error: no checkpoint in" in result.stderr


class Planted:
    """What an attacker would put in a run folder: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", ["checkpoint.pt", "checkpoint_rng_0_step3.pt"])
@pytest.mark.slow
def test_a_planted_pickle_is_refused_and_runs_nothing(target, tmp_path, monkeypatch, capfd):
    """Regression: checkpoint.py loaded both files with weights_only=False, so `resume=DIR` ran the command a
    crafted checkpoint's __reduce__ named. Now only tensors and plain containers load."""
    import torch

    run_dir = tmp_path / "run"
    run_in_process([*TINY[:-1], "train.max_steps=4"], run_dir)  # leaves a real checkpoint (kept)
    before = (run_dir / "metrics.json").read_text()
    marker = tmp_path / "PWNED"
    torch.save({"step": Planted(str(marker))}, run_dir / target)
    result = run_here([f"resume={run_dir}"], tmp_path, monkeypatch, capfd)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "lorambo-run: error:" in result.stderr and "not loaded" in result.stderr
    assert not marker.exists()
    assert (run_dir / "metrics.json").read_text() == before  # the finished run's result is untouched


def stop_by_signal(sig, tmp_path, args):
    """Start the real script, send `sig` once its first checkpoint is on disk, and return (exit code, stderr)."""
    proc = cli([*args, "hydra.run.dir=stopped"], tmp_path)
    deadline = time.time() + 300
    while not os.path.exists(tmp_path / "stopped" / "checkpoint.pt") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def assert_stopped_cleanly(run_dir, code, err, expected_code, how):
    import fcntl
    import re

    assert code == expected_code and "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("lorambo-run: error:")]
    assert len(lines) == 1 and f"stopped by {how} at step " in lines[0], err[-2000:]
    assert f"continue with lorambo-run resume={run_dir}" in lines[0]
    assert not os.path.exists(run_dir / "metrics.json")
    with open(run_dir / ".lock", "w") as lock:  # released: another run may take the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return [int(n) for n in re.findall(r"step (\d+)", lines[0])]


STOPPED = ["experiment=smoke", "train.max_steps=80", "train.checkpoint_every=10", "seed=2", "task.max_eval_samples=16"]


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_names_the_checkpoint_to_resume_from(tmp_path):
    code, err = stop_by_signal(signal.SIGINT, tmp_path, STOPPED)
    stopped_at, saved = assert_stopped_cleanly(tmp_path / "stopped", code, err, 130, "Ctrl-C")
    assert saved % 10 == 0 and saved <= stopped_at < 80  # Ctrl-C stops where it is: the last regular checkpoint


@pytest.mark.slow
def test_a_sigterm_saves_a_checkpoint_at_its_step_and_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch,
                                                                                          capfd):
    """What SLURM sends a preempted job: the step under way ends, is checkpointed, and the run stops in one
    line; `resume=` then ends exactly as the run that was never stopped."""
    code, err = stop_by_signal(signal.SIGTERM, tmp_path, STOPPED)
    stopped_at, saved = assert_stopped_cleanly(tmp_path / "stopped", code, err, 143, "SIGTERM")
    assert saved == stopped_at and stopped_at < 80
    assert (tmp_path / "stopped" / "error.txt").exists()
    resumed = run_here(["resume=stopped"], tmp_path, monkeypatch, capfd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "stopped" / "error.txt").exists()  # the folder no longer says it failed
    run_in_process(STOPPED, tmp_path / "whole")
    a = json.load(open(tmp_path / "whole" / "metrics.json"))
    b = json.load(open(tmp_path / "stopped" / "metrics.json"))
    assert b["resumed_from_step"] == stopped_at
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
    assert losses(tmp_path / "stopped") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)


def test_a_sigterm_before_training_is_one_line_and_leaves_no_result(tmp_path, monkeypatch, capfd):
    """Preempted while the data and base load: no step to checkpoint, the folder released, nothing written."""
    import lorambo.train

    def preempted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this thread at once
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(lorambo.train, "load_data_and_base", preempted)
    handler = signal.getsignal(signal.SIGTERM)
    result = run_here(["experiment=smoke", "hydra.run.dir=run"], tmp_path, monkeypatch, capfd)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("lorambo-run: error:")]
    assert lines == ["lorambo-run: error: stopped by SIGTERM before training ended; no result written; no "
                     "checkpoint was saved (train.checkpoint_every=N saves one every N steps): run it again"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone with it
