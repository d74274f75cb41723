"""One tiny run per model family through the real training path: metric keys, parameter counts from the
saved adapter, the budget, and the PEFT round trip (the saved adapter reproduces the reported metric)."""

import csv
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorambo.data import load_task
from lorambo.models import adaptable_layers, build_model, build_tokenizer
from tests.helpers import compose_cfg, run_in_process, write_csv_splits

QUICK = ["train.max_steps=6", "train.log_every=3", "train.batch_size=8", "train.eval_batch_size=32",
         "task.max_train_samples=64", "task.max_eval_samples=48", "train.eval_every=3"]


@pytest.fixture(scope="module")
def pair_csv(tmp_path_factory):
    """A small local file of text pairs with labels (label 1 when the pair shares its first word)."""
    rng = random.Random(0)
    words = ["good", "bad", "long", "short", "red", "blue", "fast", "slow"]
    path = tmp_path_factory.mktemp("data") / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["premise", "hypothesis", "label"])
        for _ in range(200):
            a, b = rng.choice(words), rng.choice(words)
            writer.writerow([f"{a} film here", f"{b} story there", int(a == b)])
    return str(path)


FAMILIES = {
    "tiny_bert": ["model=tiny_bert", "task=rt_snippets"],
    "tiny_roberta": ["model=tiny_roberta", "task=local_file", "task.text_fields=[premise,hypothesis]"],
    "tiny_t5": ["model=tiny_t5", "task=rt_snippets"],
    "tiny_gpt2": ["model=tiny_gpt2", "task=wiki_summaries", "task.max_length=32"],
    "tiny_resnet": ["model=tiny_resnet", "task=fashion_mnist"],
}


def saved_lora_params(run_dir) -> int:
    tensors = load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    return sum(t.numel() for name, t in tensors.items() if "lora_" in name)


def layer_costs(cfg) -> dict[str, int]:
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, build_tokenizer(cfg.model))
    return {layer.name: layer.cost for layer in adaptable_layers(model, cfg.model.target_modules)}


def evaluate_independently(cfg, model) -> dict:
    """Metric of `model` on the validation split, computed here without lorambo's evaluation loop."""
    data = load_task(cfg.task, cfg.model, build_tokenizer(cfg.model))
    loader = torch.utils.data.DataLoader(data.evals["validation"], batch_size=16, collate_fn=data.collate_fn)
    model.eval()
    correct, total, nll, blocks = 0, 0, 0.0, 0
    with torch.no_grad():
        for batch in loader:
            if cfg.task.type == "image_classification":
                logits = model(batch["pixel_values"])
            else:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            if cfg.task.type == "lm":
                logp = torch.log_softmax(logits[:, :-1].double(), -1)
                token_nll = -logp.gather(-1, batch["labels"][:, 1:, None]).squeeze(-1)
                nll += token_nll.mean(1).sum().item()
                blocks += len(token_nll)
            else:
                correct += (logits.argmax(-1) == batch["labels"]).sum().item()
                total += len(batch["labels"])
    return {"perplexity": float(np.exp(nll / blocks))} if cfg.task.type == "lm" else {"accuracy": correct / total}


def load_base(cfg, run_dir):
    """The saved config-built base model, as a user would reload it."""
    if cfg.model.family == "vision":
        torch.manual_seed(1)  # a different init: the loaded state must be what counts
        model = build_model(cfg.model, cfg.task, None)
        model.load_state_dict(torch.load(os.path.join(run_dir, "base_model", "model.pt")))
        return model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if cfg.model.family == "causal_lm" else AutoModelForSequenceClassification
    return auto.from_pretrained(os.path.join(run_dir, "base_model"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_run_counts_budget_and_round_trip(family, tmp_path, pair_csv):
    from peft import PeftModel

    overrides = [*FAMILIES[family], *QUICK, "budget=r4"]
    if "task=local_file" in overrides:
        overrides.append(f"task.path={pair_csv}")
    run_dir = tmp_path / family
    metrics = run_in_process(overrides, run_dir)
    cfg = compose_cfg(overrides)

    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("adapter_params", "adapter_bytes", "adapter_mib", "head_params", "p_max", "optimizer_state_bytes",
                "peak_memory_bytes", "train_seconds", "steps", "seed", "ranks", cfg.task.main_metric):
        assert key in metrics, key
    assert metrics["steps"] == 6

    costs = layer_costs(cfg)
    assert set(metrics["ranks"]) == set(costs)
    expected = sum(r * costs[name] for name, r in metrics["ranks"].items())
    assert metrics["adapter_params"] == saved_lora_params(run_dir) == expected
    assert metrics["adapter_params"] <= metrics["p_max"] == 4 * sum(costs.values())
    assert metrics["adapter_bytes"] == 4 * metrics["adapter_params"]  # fp32 on CPU
    # AdamW: two moments per trainable parameter plus one step counter per tensor
    assert metrics["optimizer_state_bytes"] >= 8 * (metrics["adapter_params"] + metrics["head_params"])
    log = [json.loads(line) for line in (run_dir / "metrics_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == [3, 6]
    assert any(k.startswith("eval/") for r in log if r["step"] == 3 for k in r)  # train.eval_every=3
    assert (run_dir / "config_resolved.yaml").exists()

    reloaded = PeftModel.from_pretrained(load_base(cfg, run_dir), str(run_dir / "adapter"))
    again = evaluate_independently(cfg, reloaded)
    for key, value in again.items():
        assert value == pytest.approx(metrics[key], rel=1e-4), key


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


ALLOCATORS = ["frobenius_greedy", "gradient", "hessian_offline", "data_weighted", "hessian_online"]


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_allocator_runs_on_every_family(allocator, family, tmp_path, pair_csv):
    overrides = [*FAMILIES[family], *QUICK, "train.eval_every=0", "budget=r4", f"allocator={allocator}",
                 "sensitivity.gradient_batches=2", "sensitivity.hessian_batches=1", "sensitivity.covariance_batches=2"]
    if allocator == "hessian_online":
        overrides += ["method.grow_every=2", "method.growth_events=2"]
    if "task=local_file" in overrides:
        overrides.append(f"task.path={pair_csv}")
    run_dir = tmp_path / "run"
    metrics = run_in_process(overrides, run_dir)
    costs = layer_costs(compose_cfg(overrides))
    assert metrics["adapter_params"] == saved_lora_params(run_dir) == sum(
        r * costs[n] for n, r in metrics["ranks"].items())
    assert metrics["adapter_params"] <= metrics["p_max"]
    assert metrics["sensitivity_seconds"] > 0
    assert (run_dir / "sensitivities.json").exists() and (run_dir / "ranks.png").exists()
    if allocator != "hessian_online":  # offline: the budget is spent to within one rank of the costliest layer
        assert metrics["p_max"] - metrics["adapter_params"] < max(costs.values())


def test_allocation_can_be_reused_from_another_run(tmp_path):
    first = run_in_process(["experiment=smoke", "allocator=hessian_offline"], tmp_path / "first")
    again = run_in_process(["experiment=smoke", "allocator=uniform", f"allocator.from_run={tmp_path / 'first'}"],
                           tmp_path / "again")
    assert again["ranks"] == first["ranks"] and again["sensitivity_seconds"] == 0


@pytest.mark.parametrize("optimizer", ["galore", "adarankgrad"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_low_rank_optimizers_train_every_family(optimizer, family, tmp_path, pair_csv):
    overrides = [*FAMILIES[family], *QUICK, "train.eval_every=0", "method=full_ft", f"optimizer={optimizer}",
                 "optimizer.rank=2"]
    if "task=local_file" in overrides:
        overrides.append(f"task.path={pair_csv}")
    metrics = run_in_process(overrides, tmp_path / optimizer)
    adamw = run_in_process([o for o in overrides if not o.startswith("optimizer")], tmp_path / "adamw")
    assert metrics["trainable_params"] == adamw["trainable_params"]
    assert metrics["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    assert 1 <= metrics["effective_rank"] <= 2
    assert set(metrics["projection_ranks"]) == set(layer_costs(compose_cfg(overrides)))
    assert (tmp_path / optimizer / "rank_history.png").exists()


# adalora refuses convolutions (tiny_resnet): tests/test_cli.py checks its one-line error
PEFT_BASELINES = [(a, f) for a in ("dora", "adalora") for f in sorted(FAMILIES) if (a, f) != ("adalora", "tiny_resnet")]


@pytest.mark.parametrize("allocator,family", PEFT_BASELINES)
def test_peft_baselines_count_real_parameters_and_reload(allocator, family, tmp_path, pair_csv):
    from peft import PeftModel

    overrides = [*FAMILIES[family], *QUICK, "train.max_steps=8", "train.eval_every=0", "budget=r4",
                 f"method={allocator}"]
    if allocator == "adalora":
        overrides += ["method.delta_t=1"]
    if "task=local_file" in overrides:
        overrides.append(f"task.path={pair_csv}")
    run_dir = tmp_path / allocator
    metrics = run_in_process(overrides, run_dir)
    cfg = compose_cfg(overrides)
    torch.manual_seed(0)
    layers = {l.name: l for l in adaptable_layers(build_model(cfg.model, cfg.task, build_tokenizer(cfg.model)),
                                                  cfg.model.target_modules)}
    if allocator == "dora":  # LoRA factors plus one magnitude per output row
        expected = sum(r * layers[n].cost + layers[n].d_out for n, r in metrics["ranks"].items())
        assert metrics["adapter_params"] <= metrics["p_max"]
    else:  # AdaLoRA: the ranks its final pattern keeps, each an A row, a B column and a singular value
        expected = sum(r * (layers[n].cost + 1) for n, r in metrics["ranks"].items())
        # budget=r4: AdaLoRA's budget for LoRA r=4's row is total rank 4 x layers (its Table 1), not 3 x layers
        assert sum(metrics["ranks"].values()) == 4 * len(layers)
    assert metrics["adapter_params"] == expected == saved_lora_params(run_dir)
    reloaded = PeftModel.from_pretrained(load_base(cfg, run_dir), str(run_dir / "adapter"))
    for key, value in evaluate_independently(cfg, reloaded).items():
        assert value == pytest.approx(metrics[key], rel=1e-4), key


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
