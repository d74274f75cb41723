"""Device discipline without a GPU: every method, allocator and statistic on a model whose parameters and
batches sit on a device that is not the CPU's (tests/device_sim.py), where a host read (`.numpy()` of a device
tensor) or an op mixing device and host tensors raises as it does on CUDA. A run that passes here does not
move a tensor off its model's device behind the code's back; what only a GPU can check is bench/gpu_check.sh's.

Regressions: sensitivity.py read spectra with `.numpy()` on the device (frobenius_greedy, data_weighted,
hessian_offline's knapsack, update spectra); ARD-LoRA's rank scales were made on the CPU outside the model;
AdaLoRA's importance scores came back from a checkpoint on the CPU."""

import json
import os
import shutil

import pytest
import torch

from lorambo.checkpoint import resume_config
from lorambo.train import run
from tests.device_sim import SIMULATED, HostReadError, OnDevice, simulated_device
from tests.helpers import run_in_process

TINY = ["experiment=smoke", "task.max_train_samples=64", "task.max_eval_samples=32", "train.max_steps=4",
        "train.log_every=1", "sensitivity.gradient_batches=2", "sensitivity.covariance_batches=2",
        "sensitivity.fisher_batches=2", "sensitivity.hessian_batches=1", "train.mixed_precision=no"]

CASES = {  # every method, every allocator, every statistic an allocator can read
    "uniform": [],
    "frobenius_greedy": ["allocator=frobenius_greedy"],
    "frobenius_greedy_update": ["allocator=frobenius_greedy", "allocator.target=update"],
    "gradient": ["allocator=gradient"],
    "data_weighted": ["allocator=data_weighted"],
    "hessian_offline_fisher": ["allocator=hessian_offline"],
    "hessian_offline_trace_knapsack": ["allocator=hessian_offline", "allocator.sensitivity=hessian_trace",
                                       "allocator.variant=knapsack"],
    "hessian_offline_opnorm": ["allocator=hessian_offline", "allocator.sensitivity=hessian_opnorm"],
    "hessian_offline_empirical_fisher": ["allocator=hessian_offline", "sensitivity.fisher_labels='true'"],
    "eva": ["allocator=eva"],
    "gora": ["allocator=gora"],
    "hessian_online": ["allocator=hessian_online", "method.grow_every=2", "method.growth_events=1"],
    "hessian_online_offline_start": ["allocator=hessian_online", "allocator.start=offline", "method.grow_every=2",
                                     "method.growth_events=1"],
    "dora": ["method=dora"],
    "adalora": ["method=adalora", "method.delta_t=1"],
    "ard_lora": ["method=ard_lora"],
    "full_ft": ["method=full_ft"],
    "galore": ["method=full_ft", "optimizer=galore", "optimizer.rank=2"],
    "adarankgrad": ["method=full_ft", "optimizer=adarankgrad", "optimizer.min_gap=1", "optimizer.max_gap=2"],
    "head_warmup": ["allocator=gradient", "sensitivity.head_warmup_steps=2"],
    "causal_lm_fisher": ["model=tiny_gpt2", "task=wiki_summaries", "task.max_length=32", "allocator=hessian_offline"],
    "instruct": ["model=tiny_gpt2", "task=arithmetic", "task.max_length=64", "task.max_eval_samples=4",
                 "task.max_test_samples=2", "task.max_new_tokens=2", "task.forgetting.max_eval_samples=4",
                 "allocator=hessian_offline"],
    "vision_data_weighted": ["model=tiny_resnet", "task=fashion_mnist", "allocator=data_weighted"],
}


@pytest.fixture
def device_run(monkeypatch):
    """A run through train.run whose accelerator places everything on the simulated device."""
    # PEFT's EVA finds the model's device among parameters not on `meta` (to it, weights not loaded yet): on the
    # simulated device that is every parameter, so it is told the device
    from peft.tuners.lora import eva

    monkeypatch.setattr(eva, "get_device_with_meta_params", lambda model: next(model.parameters()).device)

    def go(overrides, run_dir, resume=False):
        from accelerate.state import PartialState

        PartialState._reset_state()  # accelerate keeps its device for the process: read it anew, and after
        try:
            with monkeypatch.context() as env, simulated_device() as mode:
                env.setenv("ACCELERATE_TORCH_DEVICE", str(SIMULATED))  # accelerate's own switch of device
                metrics = (run(resume_config(str(run_dir)), str(run_dir)) if resume
                           else run_in_process([*TINY, *overrides], run_dir))
        finally:
            PartialState._reset_state()
        assert mode.device_ops > 100, "the run never reached the simulated device"
        return metrics

    return go


def train_losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics_log.jsonl")) as f:
        return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow
def test_every_method_and_allocator_keeps_to_the_models_device(case, device_run, tmp_path):
    metrics = device_run(CASES[case], tmp_path / case)
    assert os.path.exists(tmp_path / case / "metrics.json")
    assert metrics["steps"] == 4


@pytest.mark.slow
def test_the_simulated_device_computes_what_the_cpu_computes(device_run, tmp_path):
    """The check is only worth its name if the run it lets through is the real run: same losses, same metric."""
    overrides = ["allocator=hessian_offline", "allocator.variant=knapsack"]
    plain = run_in_process([*TINY, *overrides], tmp_path / "cpu")
    simulated = device_run(overrides, tmp_path / "device")
    assert simulated["ranks"] == plain["ranks"]
    assert train_losses(tmp_path / "device") == pytest.approx(train_losses(tmp_path / "cpu"), abs=1e-5)
    assert simulated["accuracy"] == plain["accuracy"]


@pytest.mark.parametrize("case", ["adalora", "ard_lora", "hessian_online", "galore"])
@pytest.mark.slow
def test_restored_state_goes_back_to_its_owners_device(case, device_run, tmp_path):
    """Resume reads a checkpoint on the host (map_location=cpu); every tensor must go back to the device of
    what owns it (AdaLoRA's importance scores mixed with device tensors once pruning had begun)."""
    whole = tmp_path / "whole"
    extra = ["train.max_steps=8", "train.checkpoint_every=4", "train.keep_checkpoint=true"]
    if case == "hessian_online":  # growth events at steps 2, 4 and 6: one after the resumed checkpoint
        extra.append("method.growth_events=3")
    expected = device_run([*CASES[case], *extra], whole)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    os.remove(resumed / "metrics.json")
    got = device_run([], resumed, resume=True)
    assert got["resumed_from_step"] == 4 and got["ranks"] == expected["ranks"]
    assert train_losses(resumed) == pytest.approx(train_losses(whole), abs=1e-5)


def test_the_simulation_refuses_what_cuda_refuses():
    """The rules themselves: a host read and a mixed op raise; .cpu(), .item(), .tolist() and 0-dim host
    scalars are allowed, as on CUDA."""
    with simulated_device():
        x = torch.arange(6.0).reshape(2, 3).to(SIMULATED)
        assert isinstance(x, OnDevice) and x.device == SIMULATED
        with pytest.raises(HostReadError):
            x.numpy()
        with pytest.raises(HostReadError):
            x + torch.ones(3)
        assert (x * torch.tensor(2.0)).cpu().tolist() == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]
        assert x.sum().item() == 15.0 and x.tolist()[1] == [3.0, 4.0, 5.0]
        assert x.cpu().numpy().sum() == 15.0
        assert isinstance(torch.zeros(2, device=x.device), OnDevice)


@pytest.mark.parametrize("allocator", ["frobenius_greedy", "data_weighted", "hessian_offline"])
@pytest.mark.slow
def test_lorambo_allocate_keeps_to_the_models_device(allocator, monkeypatch, tmp_path):
    """lorambo-allocate measures on the accelerator's device too (its spectra were read with .numpy() there)."""
    from accelerate.state import PartialState

    from lorambo.allocate import write_allocation_for_peft
    from tests.helpers import compose_cfg

    cfg = compose_cfg(["logger=none", *TINY, f"allocator={allocator}"])
    PartialState._reset_state()
    try:
        with monkeypatch.context() as env, simulated_device() as mode:
            env.setenv("ACCELERATE_TORCH_DEVICE", str(SIMULATED))
            allocation = write_allocation_for_peft(cfg, str(tmp_path))
    finally:
        PartialState._reset_state()
    assert mode.device_ops > 100 and allocation["adapter_params"] <= allocation["p_max"]
    assert (tmp_path / "adapter_config.json").exists()
