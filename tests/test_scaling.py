"""One update scale policy for every layer (`lora.scaling`): each layer's effective scale read from the wrapped
model, for every allocator on every model family; a uniform run unchanged by the policy; saved adapters reload
with their scales."""

import json
import math

import pytest
import torch
from accelerate import Accelerator

from lorambo.adapters import effective_scalings, wrap_lora
from lorambo.allocators.uniform import uniform_rank
from lorambo.budget import resolve_p_max
from lorambo.data import load_task
from lorambo.models import adaptable_layers, build_model, build_tokenizer
from lorambo.allocation import choose_ranks
from lorambo.methods import build_method
from tests.helpers import compose_cfg, run_in_process
from tests.test_runs import FAMILIES, QUICK, evaluate_independently, load_base, pair_csv  # noqa: F401

ALLOCATORS = [("uniform", "lora"), ("frobenius_greedy", "lora"), ("gradient", "lora"), ("hessian_offline", "lora"),
              ("data_weighted", "lora"), ("hessian_online", "growth"), ("uniform", "dora")]
SMALL = ["task.max_train_samples=64", "task.max_eval_samples=16", "train.batch_size=8",
         "sensitivity.gradient_batches=2", "sensitivity.hessian_batches=1", "sensitivity.covariance_batches=2",
         "sensitivity.fisher_batches=2"]


def policy_value(scaling, alpha, r, r_u):
    return {"matched": alpha / r_u, "per_layer": alpha / r, "rslora": alpha / math.sqrt(r)}[scaling]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_allocator_gets_the_policy_scale_on_every_layer(family, tmp_path, pair_csv):
    overrides = [*FAMILIES[family], *SMALL, "budget=r4"]
    if "task=local_file" in overrides:
        overrides.append(f"task.path={pair_csv}")
    cfg = compose_cfg(overrides)
    tokenizer = build_tokenizer(cfg.model)
    data = load_task(cfg.task, cfg.model, tokenizer)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    base = build_model(cfg.model, cfg.task, tokenizer)
    layers = adaptable_layers(base, cfg.model.target_modules)
    p_max = resolve_p_max(cfg.budget, layers)
    r_u = uniform_rank(layers, p_max)
    assert r_u == 4
    non_uniform = 0
    for allocator, method_name in ALLOCATORS:
        acfg = compose_cfg([*overrides, f"allocator={allocator}", f"method={method_name}"])
        method = build_method(acfg, layers, 10, str(tmp_path), True)
        ranks = choose_ranks(acfg, method, base, layers, p_max, data, accelerator, str(tmp_path))["ranks"]
        non_uniform += len(set(ranks.values())) > 1
        for scaling in ("matched", "per_layer", "rslora"):
            lora = acfg.lora.copy()
            lora.scaling = scaling
            import copy
            model = wrap_lora(copy.deepcopy(base), ranks, acfg.model.head_modules, lora,
                              method.use_dora, r_u)
            got = effective_scalings(model)
            assert set(got) == set(ranks)
            for name, scale in got.items():
                assert scale == pytest.approx(policy_value(scaling, lora.alpha, ranks[name], r_u), rel=1e-12), (
                    allocator, scaling, name)
    assert non_uniform >= 2  # the check saw allocations where the policies differ


def test_a_uniform_run_is_identical_under_matched_and_per_layer(tmp_path):
    runs = {}
    for scaling in ("matched", "per_layer"):
        runs[scaling] = run_in_process(["experiment=smoke", f"lora.scaling={scaling}"], tmp_path / scaling)
    a, b = runs["matched"], runs["per_layer"]
    assert a["accuracy"] == b["accuracy"] and a["ranks"] == b["ranks"]
    assert a["lora_scaling"] == "matched" and b["lora_scaling"] == "per_layer"
    loss = lambda s: [r["train/loss"] for r in map(json.loads, (tmp_path / s / "metrics_log.jsonl").read_text()
                                                             .splitlines()) if "train/loss" in r]
    assert loss("matched") == loss("per_layer")


@pytest.mark.parametrize("allocator", ["hessian_offline", "hessian_online", "ard_lora"])
def test_saved_adapter_reloads_with_the_matched_scale(allocator, tmp_path):
    """Non-uniform ranks (grown online, cut by ARD-LoRA) at the matched scale: the reloaded adapter has alpha / r_u
    on every layer and reproduces the run's metric."""
    from peft import PeftModel

    overrides = [*FAMILIES["tiny_bert"], *QUICK, "train.eval_every=0", "budget=r4",
                 "method=ard_lora" if allocator == "ard_lora" else f"allocator={allocator}"]
    if allocator == "ard_lora":
        overrides.append("method.alpha_lr=0.2")  # scales that move in 6 steps
    run_dir = tmp_path / allocator
    metrics = run_in_process(overrides, run_dir)
    cfg = compose_cfg(overrides)
    reloaded = PeftModel.from_pretrained(load_base(cfg, run_dir), str(run_dir / "adapter"))
    got = effective_scalings(reloaded)
    if allocator != "ard_lora":  # ARD-LoRA is built at rank 2 r0 and cut: per_layer would give alpha / 2 r0
        assert len(set(metrics["ranks"].values())) > 1
    assert all(s == pytest.approx(cfg.lora.alpha / 4, rel=1e-12) for s in got.values()), got
    for key, value in evaluate_independently(cfg, reloaded).items():
        assert value == pytest.approx(metrics[key], rel=1e-4), key


def test_unknown_scaling_is_one_line(tmp_path):
    from lorambo.errors import LoramboError

    with pytest.raises(LoramboError, match="lora.scaling"):
        run_in_process(["experiment=smoke", "lora.scaling=huge"], tmp_path)


def test_allocation_json_names_its_statistic_with_error_bars_and_leaves_no_layer_out(tmp_path):
    metrics = run_in_process(["experiment=smoke", "allocator=hessian_offline", "allocator.sensitivity=hessian_trace",
                              "budget=r1", "sensitivity.hessian_batches=2", "sensitivity.hutchinson_probes=2"],
                             tmp_path)
    allocation = json.loads((tmp_path / "allocation.json").read_text())
    assert allocation["statistics"] == ["hessian_trace"] and allocation["lora_scaling"] == "matched"
    assert "left_out" not in allocation and len(allocation["ranks"]) == len(metrics["ranks"]) == 12
    bars = allocation["sensitivity"]["hessian_trace"]
    assert set(bars) == set(allocation["ranks"])
    for layer in bars.values():
        assert layer["samples"] == 4 and layer["standard_error"] > 0 and 0 <= layer["non_positive"] <= 4
    saved = json.loads((tmp_path / "sensitivities.json").read_text())
    assert saved["errors"]["hessian_trace"] == bars_without_mean(bars)


def bars_without_mean(bars):
    return {name: {k: v for k, v in b.items() if k != "mean"} for name, b in bars.items()}
