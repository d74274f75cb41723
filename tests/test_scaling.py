"""One update scale policy for every layer (`lora.scaling`): a uniform run unchanged by the policy; saved adapters
reload with their scales (each layer's scale under each policy, for every allocator on every family, is checked
in test_allocation_on_families.py)."""

import json

import pytest

from lorambo.adapters import effective_scalings
from tests.helpers import FAMILIES, QUICK, compose_cfg, evaluate_independently, load_base, run_in_process


@pytest.mark.slow
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
@pytest.mark.slow
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


@pytest.mark.slow
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
