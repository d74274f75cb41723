"""Beyond one process: data-parallel with torchrun (two CPU processes on gloo) and the cluster launcher
(Hydra's submitit plugin, through its local executor)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from lorambo.config import CONF_DIR
from tests.helpers import free_port, run_here, run_in_process

# no dropout anywhere and float32, so one process and two differ only by the order of floating-point sums (bf16
# autocast rounds a half batch's matmuls differently from the whole batch's: growth decisions near a tie differ)
DETERMINISTIC = ["experiment=smoke", "lora.dropout=0", "++model.hf_config.hidden_dropout_prob=0",
                 "++model.hf_config.attention_probs_dropout_prob=0", "train.max_steps=12", "train.mixed_precision=no",
                 "allocator=hessian_online", "method.grow_every=4", "method.growth_events=2", "logger=none"]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same run as one process with batch 16 and as two processes (torchrun, gloo) with batch 8 each."""
    tmp_path = tmp_path_factory.mktemp("scale")
    run_in_process([*DETERMINISTIC, "train.batch_size=16"], tmp_path / "one")  # one process: this one
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "lorambo.cli",
                          *DETERMINISTIC, "train.batch_size=8", "hydra.run.dir=two"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    load = lambda d, f: json.load(open(tmp_path / d / f))
    lr = lambda d: [(r["step"], r["train/lr"], r["train/loss"])
                    for r in map(json.loads, open(tmp_path / d / "metrics_log.jsonl")) if "train/lr" in r]
    return {d: (load(d, "metrics.json"), load(d, "allocation.json")["ranks"], lr(d)) for d in ("one", "two")}


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # one worker sets up `one_and_two`, once
def test_two_processes_match_one_with_the_same_global_batch(one_and_two):
    (a, allocation_one, _), (b, allocation_two, _) = one_and_two["one"], one_and_two["two"]
    assert allocation_one == allocation_two  # the same sensitivity estimate, the same initial ranks
    assert b["steps"] == a["steps"] == 12
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1 / 128)  # at most one of 128 predictions flips
    assert b["p_max"] == a["p_max"]


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # one worker sets up `one_and_two`, once
def test_two_processes_follow_the_same_learning_rate_schedule_and_log_the_same_loss(one_and_two):
    # accelerate steps a prepared scheduler once per process: a schedule laid out for one process ran N times
    # too fast (it reached zero halfway through a two-process run)
    one, two = one_and_two["one"][2], one_and_two["two"][2]
    assert len(one) >= 3 and [r[0] for r in one] == [r[0] for r in two]
    assert [r[1] for r in two] == pytest.approx([r[1] for r in one], rel=1e-9)
    # the logged loss is the mean over all processes' examples, not the main process's half
    assert [r[2] for r in two] == pytest.approx([r[2] for r in one], rel=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # one worker sets up `one_and_two`, once
def test_two_processes_grow_as_one(one_and_two):
    assert one_and_two["one"][0]["ranks"] == one_and_two["two"][0]["ranks"]


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


@pytest.mark.slow
def test_sweep_through_submitit_local_executor(tmp_path, monkeypatch, capfd):
    # the command in this process; submitit starts the job as a process of its own (one job: a sweep's cells
    # getting their own overrides is Hydra's sweeper, tested with the basic launcher)
    result = run_here(["-m", "experiment=smoke", "budget=r1", "train.max_steps=4", "hydra/launcher=local",
                       "hydra.sweep.dir=sweep"], tmp_path, monkeypatch, capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.load(open(p)) for p in glob.glob(str(tmp_path / "sweep" / "*" / "metrics.json"))]
    assert len(runs) == 1 and runs[0]["steps"] == 4 and set(runs[0]["ranks"].values()) == {1}  # budget r1
    assert glob.glob(str(tmp_path / "sweep" / ".submitit" / "*" / "*_log.out"))  # ran as submitit jobs
