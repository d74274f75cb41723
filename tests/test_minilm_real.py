"""The real offline default: pretrained MiniLM-L6 on the real Rotten Tomatoes snippets learns."""

import pytest

from tests.helpers import run_in_process


def test_pretrained_minilm_learns_sentiment(tmp_path):
    # 100 steps of batch 16 on 1,600 training snippets, 400 held-out ones (about a minute on 2 cores)
    metrics = run_in_process(["task.max_train_samples=1600", "task.max_eval_samples=400", "train.max_steps=100"],
                             tmp_path / "minilm")
    assert metrics["model"] == "minilm" and metrics["task"] == "rt_snippets"
    # the validation set is balanced (about 50% each class): chance is 0.5, a constant guess at most ~0.55
    assert metrics["accuracy"] > 0.7, metrics["accuracy"]


@pytest.mark.parametrize("allocator", ["frobenius_greedy", "gradient", "hessian_offline", "data_weighted",
                                       "hessian_online"])
def test_every_allocator_runs_on_the_real_minilm(allocator, tmp_path):
    overrides = ["task.max_train_samples=256", "task.max_eval_samples=64", "train.max_steps=6", "budget=r4",
                 f"allocator={allocator}", "method.grow_every=3" if allocator == "hessian_online" else "seed=0"]
    metrics = run_in_process(overrides, tmp_path / allocator)
    assert len(metrics["ranks"]) >= 1 and metrics["adapter_params"] <= metrics["p_max"]
    assert metrics["sensitivity_seconds"] > 0
    if allocator != "hessian_online":
        assert metrics["p_max"] - metrics["adapter_params"] < 384 + 1536  # one rank of the costliest layer


@pytest.mark.parametrize("method", [["method=dora"], ["method=adalora", "method.delta_t=1"],
                                    ["method=ard_lora"], ["method=full_ft", "optimizer=galore"],
                                    ["method=full_ft", "optimizer=adarankgrad"]])
def test_related_methods_run_on_the_real_minilm(method, tmp_path):
    metrics = run_in_process(["task.max_train_samples=256", "task.max_eval_samples=64", "train.max_steps=6",
                              "budget=r4", *method], tmp_path / "run")
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["optimizer_state_bytes"] > 0
    if "method=full_ft" in method:
        assert 1 <= metrics["effective_rank"] <= 4
    elif "method=adalora" in method:  # AdaLoRA budgets total rank (LoRA r4's: 4 per layer); its pattern, the count
        assert sum(metrics["ranks"].values()) == 4 * 36 and metrics["adapter_params"] > 0  # 6 blocks x 6 matrices
    else:
        assert 0 < metrics["adapter_params"] <= 1.05 * metrics["p_max"]
