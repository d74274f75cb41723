"""The tuned protocol: a dev split carved from train, the grid, the choice, and a whole tuned sweep through the
CLI whose report says it was tuned and shows the search."""

import json

import pytest
import torch

from lorambo.data import load_task
from lorambo.evaluation import reported_metrics
from lorambo.models import build_tokenizer
from lorambo.tuning import best_point, grid_points
from tests.helpers import compose_cfg, run_here


def test_grid_crosses_learning_rates_with_scale_policies_only_for_rows_that_have_one():
    lora = grid_points(5e-4, [1 / 3, 1, 3], ["matched", "per_layer"], True)
    assert [(p["train.lr"], p["lora.scaling"]) for p in lora] == [
        (1.67e-4, "matched"), (1.67e-4, "per_layer"), (5e-4, "matched"), (5e-4, "per_layer"),
        (1.5e-3, "matched"), (1.5e-3, "per_layer")]
    assert grid_points(5e-4, [1 / 3, 1, 3], ["matched", "per_layer"], False) == [
        {"train.lr": 1.67e-4}, {"train.lr": 5e-4}, {"train.lr": 1.5e-3}]


def test_best_point_maximises_accuracy_minimises_perplexity_and_skips_failures():
    scored = lambda metric, values: [{"point": {"train.lr": i}, "metric": metric, "dev_score": v}
                                     for i, v in enumerate(values)]
    assert best_point(scored("accuracy", [0.7, None, 0.8, 0.8]))["point"] == {"train.lr": 2}  # first of equals
    assert best_point(scored("perplexity", [30.0, 20.0, None]))["point"] == {"train.lr": 1}
    assert best_point(scored("accuracy", [None, None])) is None


@pytest.mark.slow
def test_dev_split_is_carved_from_train_the_same_for_every_seed_and_never_from_validation():
    overrides = ["experiment=smoke", "++task.dev_fraction=0.25"]
    cfg = compose_cfg(overrides)
    plain = load_task(compose_cfg(["experiment=smoke"]).task, cfg.model, build_tokenizer(cfg.model))
    data = load_task(cfg.task, cfg.model, build_tokenizer(cfg.model))
    assert list(data.evals) == ["dev"]
    assert len(data.evals["dev"]) == 64 and len(data.train) == 256 - 64  # smoke: 256 training examples
    rows = lambda ds: {tuple(x["input_ids"].tolist()) for x in ds}
    train, dev, full = rows(data.train), rows(data.evals["dev"]), rows(plain.train)
    assert not train & dev and train | dev == full  # a partition of the training split
    torch.manual_seed(123)  # the run's seed does not move it
    again = load_task(compose_cfg([*overrides, "seed=5"]).task, cfg.model, build_tokenizer(cfg.model))
    assert rows(again.evals["dev"]) == dev


def test_a_dev_run_reports_the_plain_metric_name():
    assert reported_metrics(compose_cfg(["task=mnli"]).task, ["dev"]) == ["accuracy"]
    assert reported_metrics(compose_cfg(["task=mnli"]).task, ["matched", "mismatched"]) == [
        "accuracy_matched", "accuracy_mismatched"]
    assert reported_metrics(compose_cfg([]).task, ["validation"]) == ["accuracy"]


@pytest.mark.slow
def test_a_tuned_sweep_searches_every_row_alike_then_runs_the_choice_over_seeds(tmp_path, monkeypatch, capfd):
    """As a user runs it, side by side (hydra/launcher=parallel: joblib's worker processes, each with cores / 2
    threads, each writing its own complete run folder)."""
    from lorambo.devices import machine_cores

    sweep = tmp_path / "tuned"
    result = run_here(["experiment=tuned", "model=tiny_bert", "table_row=uniform,adalora", "seed=0,1",
                      "task.max_train_samples=128", "task.max_eval_samples=64", "train.max_steps=3",
                      "train.batch_size=8", "hydra.sweeper.lr_factors=[0.5,4]", f"hydra.sweep.dir={sweep}",
                      "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], tmp_path, monkeypatch, capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((sweep / "tuning.json").read_text())
    assert [c["overrides"][0] for c in record["cells"]] == ["table_row=uniform", "table_row=adalora"]
    searched = {}
    for folder in sorted((sweep / "search").iterdir()):
        m = json.loads((folder / "metrics.json").read_text())
        assert m["eval_splits"] == ["dev"] and m["seed"] == 0
        searched.setdefault(m["method"], []).append((m["lr"], m["accuracy"]))
    # the same learning rates for both rows (the tiny model's 1e-3 x 0.5 and x 4), LoRA's under both policies
    assert sorted({lr for lr, _ in searched["lora"]}) == sorted({lr for lr, _ in searched["adalora"]}) == [5e-4, 4e-3]
    assert len(searched["lora"]) == 4 and len(searched["adalora"]) == 2
    finals = [json.loads((d / "metrics.json").read_text()) for d in sorted(sweep.iterdir())
              if (d / "metrics.json").exists()]
    assert len(finals) == 4 and all(m["eval_splits"] == ["validation"] for m in finals)
    assert all(m["threads"] == max(1, machine_cores() // 2) for m in finals)
    for cell in record["cells"]:
        method = "adalora" if "adalora" in cell["overrides"][0] else "lora"
        best = max(score for _, score in searched[method])  # the choice, recomputed from the search's own files
        assert cell["dev_score"] == best
        assert {m["seed"] for m in finals if m["method"] == method} == {0, 1}
        assert all(m["lr"] == cell["chosen"]["train.lr"] for m in finals if m["method"] == method)
    out = run_here([str(sweep), "--no-plots"], tmp_path, monkeypatch, capfd, program="lorambo-report")
    assert out.returncode == 0, out.stderr[-2000:]
    report = out.stdout
    assert "**Tuned**" in report and "Learning-rate search" in report and "table_row=adalora" in report
    assert "dev" not in {m for line in report.splitlines() if line.startswith("| tiny_bert") for m in line.split()}


def test_the_search_table_flags_a_choice_at_the_grid_edge():
    from lorambo.report.render import search_table

    grid = lambda scores: [{"point": {"train.lr": lr}, "metric": "accuracy", "dev_score": s}
                           for lr, s in zip((1e-4, 3e-4, 9e-4), scores)]
    record = {"cells": [{"overrides": ["table_row=a"], "grid": grid([0.7, 0.8, 0.9]), "chosen": {"train.lr": 9e-4},
                         "dev_score": 0.9},
                        {"overrides": ["table_row=b"], "grid": grid([0.7, 0.9, 0.8]), "chosen": {"train.lr": 3e-4},
                         "dev_score": 0.9}]}
    lines = search_table({"sweep": record})
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| table_row")}
    assert "grid's edge" in row["table_row=a"] and "grid's edge" not in row["table_row=b"]
    assert "lr=0.0003: 0.9000" in row["table_row=b"]
