"""Runs through the real training path, one diagonal: every model family once with its full checks (metric keys,
parameter counts from the saved adapter, the budget, the PEFT round trip: the saved adapter reproduces the
reported metric), then every allocator, method and optimizer end to end on two families (one encoder or vision
model, one of the newer ones). That every allocator spends the budget on every family's layers, and that PEFT
wraps each allocation exactly, is checked without training in test_allocation_on_families.py."""

import json

import pytest
import torch

from lorambo.models import adaptable_layers, build_model, build_tokenizer
from tests.helpers import (FAMILIES, FAST, QUICK, built, compose_cfg, family_overrides, run_and_check, run_in_process,
                           write_csv_splits)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_run_counts_budget_and_round_trip(family, tmp_path, pair_csv):
    overrides = [*family_overrides(family, pair_csv), *QUICK, "budget=r4"]
    run_dir = tmp_path / family
    metrics = run_and_check(overrides, run_dir)
    cfg, base = built(overrides)
    costs = {layer.name: layer.cost for layer in adaptable_layers(base, cfg.model.target_modules)}

    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("adapter_params", "adapter_bytes", "adapter_mib", "head_params", "p_max", "optimizer_state_bytes",
                "peak_memory_bytes", "train_seconds", "steps", "seed", "ranks", cfg.task.main_metric):
        assert key in metrics, key
    assert metrics["steps"] == 6
    assert set(metrics["ranks"]) == set(costs) and set(metrics["ranks"].values()) == {4}  # uniform at r4
    assert metrics["p_max"] == 4 * sum(costs.values())
    assert metrics["adapter_bytes"] == 4 * metrics["adapter_params"]  # fp32 on CPU
    # AdamW: two moments per trainable parameter plus one step counter per tensor
    assert metrics["optimizer_state_bytes"] >= 8 * (metrics["adapter_params"] + metrics["head_params"])
    log = [json.loads(line) for line in (run_dir / "metrics_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == [3, 6]
    assert any(k.startswith("eval/") for r in log if r["step"] == 3 for k in r)  # train.eval_every=3
    assert (run_dir / "config_resolved.yaml").exists()


VARIANTS = {
    "frobenius_greedy": ["allocator=frobenius_greedy"],
    "gradient": ["allocator=gradient"],
    "hessian_offline": ["allocator=hessian_offline"],
    "data_weighted": ["allocator=data_weighted"],
    "growth": ["allocator=hessian_online", "method.grow_every=2", "method.growth_events=2"],
    "eva": ["allocator=eva"],
    "gora": ["allocator=gora"],
    "adalora": ["method=adalora", "method.delta_t=1", "train.max_steps=8"],
    "dora": ["method=dora"],
    "ard_lora": ["method=ard_lora"],
}
# each on two families: one of the first five (BERT, RoBERTa, T5, GPT-2, ResNet), one of the newer four; EVA and
# AdaLoRA take no convolution (tiny_resnet: test_cli.py checks their one-line errors)
DIAGONAL = {
    "frobenius_greedy": ("tiny_resnet", "tiny_qwen2"), "gradient": ("tiny_t5", "tiny_mistral"),
    "hessian_offline": ("tiny_gpt2", "tiny_deberta_v3"), "data_weighted": ("tiny_roberta", "tiny_llama"),
    "growth": ("tiny_resnet", "tiny_mistral"), "eva": ("tiny_bert", "tiny_qwen2"),
    "gora": ("tiny_resnet", "tiny_deberta_v3"), "adalora": ("tiny_t5", "tiny_llama"),
    "dora": ("tiny_gpt2", "tiny_qwen2"), "ard_lora": ("tiny_bert", "tiny_mistral"),
}


@pytest.mark.parametrize("variant,family", [(v, f) for v, fs in DIAGONAL.items() for f in fs])
def test_every_allocator_and_method_runs_within_budget_and_reloads(variant, family, tmp_path, pair_csv):
    # an offline allocator's adapter is plain LoRA at its ranks, saved and reloaded as every family's round trip
    # above checks (and PEFT's wrap of every allocation: test_allocation_on_families); methods, growth and EVA
    # (PEFT's own initialisation, which may move ranks) are reloaded here
    plain_lora = variant in ("frobenius_greedy", "gradient", "hessian_offline", "data_weighted", "gora")
    metrics = run_and_check([*family_overrides(family, pair_csv), *FAST, *VARIANTS[variant]], tmp_path / "run",
                            round_trip=not plain_lora)
    if plain_lora or variant == "eva":  # allocators that measure statistics first
        assert metrics["sensitivity_seconds"] > 0
        assert (tmp_path / "run" / "sensitivities.json").exists() and (tmp_path / "run" / "ranks.png").exists()
    if variant == "growth":
        assert metrics["growth_events"] >= 1


@pytest.mark.parametrize("optimizer,family", [("galore", "tiny_resnet"), ("galore", "tiny_llama"),
                                              ("adarankgrad", "tiny_gpt2"), ("adarankgrad", "tiny_roberta")])
def test_low_rank_optimizers_train_every_weight_with_less_state(optimizer, family, tmp_path, pair_csv):
    overrides = [*family_overrides(family, pair_csv), *QUICK, "train.eval_every=0", "method=full_ft",
                 f"optimizer={optimizer}", "optimizer.rank=2"]
    metrics = run_in_process(overrides, tmp_path / optimizer)
    cfg, model = built(overrides)
    n_params = sum(p.numel() for p in model.parameters())
    assert metrics["trainable_params"] == n_params
    # AdamW keeps two float32 moments of every parameter (8 bytes each); the projected ones keep less
    assert metrics["optimizer_state_bytes"] < 8 * n_params
    assert 1 <= metrics["effective_rank"] <= 2
    assert set(metrics["projection_ranks"]) == {l.name for l in adaptable_layers(model, cfg.model.target_modules)}
    assert (tmp_path / optimizer / "rank_history.png").exists()


def test_full_ft_trains_every_weight(tmp_path):
    metrics = run_in_process(["model=tiny_bert", "task=rt_snippets", "method=full_ft", *QUICK], tmp_path / "ft")
    torch.manual_seed(0)
    cfg = compose_cfg(["model=tiny_bert"])
    n_params = sum(p.numel() for p in build_model(cfg.model, cfg.task, build_tokenizer(cfg.model)).parameters())
    assert metrics["trainable_params"] == n_params
    assert metrics["adapter_params"] == 0 and metrics["ranks"] == {} and metrics["p_max"] is None
    assert metrics["optimizer_state_bytes"] >= 8 * n_params
    assert (tmp_path / "ft" / "model" / "config.json").exists()


def test_mnli_style_eval_splits_are_reported_separately(tmp_path, pair_csv):
    """Two eval splits (as MNLI matched/mismatched) give two metric keys, each from its own split."""
    overrides = ["model=tiny_bert", "task=local_file", f"task.path={pair_csv}", f"task.validation_path={pair_csv}",
                 "task.text_fields=[premise,hypothesis]", "+task.eval_splits={matched: validation, mismatched: train}",
                 *QUICK]
    metrics = run_in_process(overrides, tmp_path / "two")
    assert {"accuracy_matched", "accuracy_mismatched"} <= set(metrics) and "accuracy" not in metrics


def test_regression_task_reports_pearson(tmp_path):
    import random

    rng = random.Random(1)
    path = tmp_path / "scores.jsonl"
    with open(path, "w") as f:
        for _ in range(120):
            n = rng.randint(0, 5)
            f.write(json.dumps({"text": " ".join(["great"] * n + ["film"]), "score": float(n)}) + "\n")
    overrides = ["model=tiny_bert", "task=local_file", f"task.path={path}", "task.type=regression",
                 "task.num_labels=1", "task.label_field=score", "task.metrics=[pearson]", "task.main_metric=pearson",
                 *QUICK]
    metrics = run_in_process(overrides, tmp_path / "reg")
    assert -1.0 <= metrics["pearson"] <= 1.0


def test_same_seed_repeats_on_cpu(tmp_path):
    args = ["model=tiny_bert", "task=rt_snippets", *QUICK]
    first = run_in_process(args, tmp_path / "a")
    second = run_in_process(args, tmp_path / "b")
    assert first["accuracy"] == second["accuracy"]
    log_a = (tmp_path / "a" / "metrics_log.jsonl").read_text().splitlines()[0]
    log_b = (tmp_path / "b" / "metrics_log.jsonl").read_text().splitlines()[0]
    assert json.loads(log_a)["train/loss"] == json.loads(log_b)["train/loss"]


def test_allocation_can_be_reused_from_another_run(tmp_path):
    first = run_in_process(["experiment=smoke", "allocator=hessian_offline"], tmp_path / "first")
    again = run_in_process(["experiment=smoke", "allocator=uniform", f"allocator.from_run={tmp_path / 'first'}"],
                           tmp_path / "again")
    assert again["ranks"] == first["ranks"] and again["sensitivity_seconds"] == 0


def test_hub_loading_path_takes_local_folders(tmp_path):
    """The paper's GLUE path (from_pretrained + datasets.load_dataset) with local folders in place of hub ids."""
    from transformers import AutoModelForSequenceClassification

    cfg = compose_cfg(["model=tiny_bert", "task=qnli"])
    torch.manual_seed(0)
    base = build_model(compose_cfg(["model=tiny_bert"]).model, cfg.task, build_tokenizer(cfg.model))
    base.save_pretrained(tmp_path / "model")
    build_tokenizer(cfg.model).save_pretrained(tmp_path / "model")

    def row(rng):
        label = rng.randint(0, 1)
        return ["is it good?", "yes it is good" if label else "no", label]

    glue = write_csv_splits(tmp_path / "qnli", ["question", "sentence", "label"], row, {"train": 96, "validation": 32})
    metrics = run_in_process(["model=bert", f"model.pretrained={tmp_path / 'model'}", "task=qnli",
                              f"task.dataset.path={glue}", "task.dataset.name=null", *QUICK, "budget=r4"],
                             tmp_path / "run")
    assert metrics["model"] == "bert" and 0 <= metrics["accuracy"] <= 1
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in base.parameters())
