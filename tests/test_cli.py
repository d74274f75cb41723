"""`lorambo-run` as a user runs it: the smoke run, wandb offline, a sweep, and every bad input."""

import glob
import json
import os
import time

import pytest

from tests.helpers import run_cli, run_main

SMOKE = ["experiment=smoke"]


def completed_runs(cwd):
    return glob.glob(os.path.join(cwd, "runs", "**", "metrics.json"), recursive=True)


@pytest.mark.slow
def test_smoke_run_is_complete_and_quick(tmp_path):
    start = time.perf_counter()
    result = run_cli(SMOKE, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 60
    (path,) = completed_runs(tmp_path)
    assert f"results: {path}" in result.stdout
    metrics = json.load(open(path))
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["steps"] == 16
    assert os.path.exists(os.path.join(os.path.dirname(path), "adapter", "adapter_config.json"))


@pytest.mark.slow
def test_wandb_offline_logs_into_the_run_folder(tmp_path, monkeypatch, capfd):
    code, _, err = run_main([*SMOKE, "logger=wandb_offline"], tmp_path, monkeypatch, capfd)
    assert code == 0, err
    (path,) = completed_runs(tmp_path)
    offline = glob.glob(os.path.join(os.path.dirname(path), "wandb", "offline-run-*", "*.wandb"))
    assert offline, "no offline wandb run written"


@pytest.mark.slow
def test_sweep_runs_every_cell(tmp_path, monkeypatch, capfd):
    code, _, err = run_main(["-m", *SMOKE, "budget=r1,r4"], tmp_path, monkeypatch, capfd)
    assert code == 0, err
    runs = sorted(completed_runs(tmp_path))
    assert len(runs) == 2
    params = sorted(json.load(open(p))["adapter_params"] for p in runs)
    assert params[1] == 4 * params[0]


BAD_INPUTS = {
    "unknown model": (["model=gpt5"], "unknown model 'gpt5'"),
    "unknown task": ([*SMOKE, "task=imagenet22k"], "unknown task 'imagenet22k'"),
    "unknown allocator": ([*SMOKE, "allocator=magic"], "unknown allocator 'magic'"),
    "budget below one rank": ([*SMOKE, "budget=6M", "budget.p_max=10"], "smaller than one rank"),
    "budget above full rank": ([*SMOKE, "budget=6M"], "exceeds full rank"),
    "missing data file": ([*SMOKE, "task=local_file", "task.path=/nonexistent/train.csv"], "data file not found"),
    "LM task on a classifier": ([*SMOKE, "task=wiki_summaries"], "does not fit model"),
    "low-rank optimizer on an adapter": ([*SMOKE, "optimizer=galore"], "use method=full_ft"),
    "adalora on convolutions": ([*SMOKE, "model=tiny_resnet", "task=fashion_mnist", "method=adalora"],
                                "adalora does not support convolutions"),
    "eva on convolutions": ([*SMOKE, "model=tiny_resnet", "task=fashion_mnist", "allocator=eva"],
                            "PEFT's EVA adapts only Linear layers"),
    "unknown optimizer": ([*SMOKE, "optimizer=sgd9"], "unknown optimizer 'sgd9'"),
    "NaN loss": ([*SMOKE, "train.lr=1e30", "train.warmup_ratio=0"], "loss became"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.slow
def test_bad_input_is_one_line_no_traceback_no_result(case, tmp_path, monkeypatch, capfd):
    args, message = BAD_INPUTS[case]
    code, _, err = run_main(args, tmp_path, monkeypatch, capfd)  # the real script: tests/test_bad_inputs.py
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lorambo-run: error:")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert completed_runs(tmp_path) == []


@pytest.mark.slow
def test_skip_finished_continues_a_sweep_without_rerunning_its_finished_runs(tmp_path, monkeypatch, capfd):
    """A sweep restarted into its folder with skip_finished=true runs only what did not finish, and a run of
    another config in the same folder is not mistaken for a finished one."""
    args = ["-m", "experiment=smoke", "logger=none", "train.max_steps=2", "seed=0,1", "hydra.sweep.dir=sweep"]
    assert run_main(args, tmp_path, monkeypatch, capfd)[0] == 0
    first, second = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    second.write_text(second.read_text()[:30])  # damaged (a copy cut short): the cell is run again, no traceback
    stamp = first.stat().st_mtime_ns
    code, out, err = run_main([*args, "skip_finished=true"], tmp_path, monkeypatch, capfd)
    assert code == 0 and out.count("not run again") == 1 and "Traceback" not in err, err[-2000:]
    assert json.loads(second.read_text())["steps"] == 2
    assert first.stat().st_mtime_ns == stamp  # the finished run was left as it was
    code, out, _ = run_main([*args, "skip_finished=true", "train.max_steps=3"], tmp_path, monkeypatch, capfd)
    assert code == 0 and "not run again" not in out  # another config: both run
    assert json.loads(first.read_text())["steps"] == 3
