"""Experiment presets: every one composes into the table it names; the CPU versions run end to end."""

import glob
import json
import os

import pytest
from omegaconf import OmegaConf

from lorambo.allocators.hessian_online import event_steps
from lorambo.cli import group_options
from lorambo.config import CONF_DIR, compose_config, preset_cells
from tests.helpers import STATS_FEW, preset_configs, run_here

PRESETS = [p for p in group_options("experiment") if p != "smoke"]


def test_the_issue_presets_exist():
    assert {"table1", "table2_lm", "table2_vision", "adarankgrad_glue", "budget_sweep", "table1_cpu",
            "adarankgrad_cpu"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.slow
@pytest.mark.xdist_group("presets")
def test_every_cell_of_every_preset_composes(preset):
    configs = preset_configs(preset)
    assert configs
    for _, cfg in configs:
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.slow
@pytest.mark.xdist_group("presets")
def test_online_growth_spends_its_budget_within_the_preset_steps(preset):
    """A preset cut to few steps must let hessian_online hold all its growth events (else it ends under budget)."""
    for cell, cfg in preset_configs(preset):
        if cfg.method.name == "growth" and cfg.train.max_steps:
            events = event_steps(cfg.train.max_steps, cfg.method.growth_events, cfg.method.grow_every)
            assert len(events) == cfg.method.growth_events and max(events) < cfg.train.max_steps, cell


def axis(cells, key):
    return sorted({o.split("=", 1)[1] for c in cells for o in c if o.startswith(key + "=")})


@pytest.mark.slow
@pytest.mark.xdist_group("presets")
def test_table1_is_paper_000_table1():
    cells = preset_cells("table1")
    assert axis(cells, "model") == ["bert", "roberta", "t5"] and axis(cells, "task") == ["mnli", "qnli", "sst2"]
    assert len(cells) == 3 * 3 * 4 * 3
    rows = {}
    for cell, cfg in preset_configs("table1"):
        rows[[o for o in cell if o.startswith("table_row=")][0]] = (
            cfg.method.name, None if cfg.method.name == "full_ft" else
            (cfg.allocator.name, cfg.budget.rank, cfg.budget.get("scale", 1.0)))
    assert rows == {"table_row=full_ft": ("full_ft", None), "table_row=lora_r4": ("lora", ("uniform", 4, 1.0)),
                    "table_row=hessian_matched": ("lora", ("hessian_offline", 4, 1.0)),
                    "table_row=hessian_paper": ("lora", ("hessian_offline", 4, 1.12))}


@pytest.mark.slow
@pytest.mark.xdist_group("presets")
def test_table1_cpu_keeps_the_papers_rows_at_half_their_rank_with_a_budget_axis():
    cells = preset_cells("table1_cpu")
    assert axis(cells, "task") == ["rt_snippets", "wiki_pairs"] and axis(cells, "seed") == ["0", "1", "2", "3", "4"]
    sweeper = OmegaConf.load(os.path.join(CONF_DIR, "experiment", "table1_cpu.yaml")).hydra.sweeper
    assert sweeper.scalings == ["matched"] and 1.0 in sweeper.lr_factors  # the same search, one scale, every row
    rows = {}
    for cell, cfg in preset_configs("table1_cpu"):
        assert cfg.train.epochs == 1 and cfg.train.max_steps is None and cfg.task.max_train_samples == 8454
        rows[[o for o in cell if o.startswith("table_row=")][0]] = (
            cfg.method.name, None if cfg.method.name == "full_ft" else
            (cfg.allocator.name, cfg.budget.rank, cfg.budget.get("scale", 1.0), cfg.allocator.get("sensitivity")))
    assert rows == {"table_row=full_ft": ("full_ft", None),
                    "table_row=lora_r1": ("lora", ("uniform", 1, 1.0, None)),
                    "table_row=hessian_r1x1.5": ("lora", ("hessian_offline", 1, 1.5, "fisher_trace")),
                    "table_row=lora_r2": ("lora", ("uniform", 2, 1.0, None)),
                    "table_row=hessian_matched_r2": ("lora", ("hessian_offline", 2, 1.0, "fisher_trace")),
                    "table_row=hessian_paper_r2": ("lora", ("hessian_offline", 2, 1.12, "fisher_trace")),
                    "table_row=lora_r8": ("lora", ("uniform", 8, 1.0, None))}


@pytest.mark.parametrize("preset,allocators,length,columns", [
    ("table2_vision_cpu", ["uniform", "frobenius_greedy", "hessian_offline", "hessian_online", "data_weighted",
                           "gora"], ("epochs", 1), ["6M", "12M"]),
    ("table2_lm_cpu", ["uniform", "frobenius_greedy", "hessian_offline", "hessian_online", "data_weighted"],
     ("max_steps", 80), ["12M", "24M"])])
@pytest.mark.slow
def test_table2_cpu_keeps_the_papers_rows_and_budget_ratio_at_ranks_that_bind(preset, allocators, length, columns):
    """Uniform r2 and r4's exact parameters on the model as built (the paper's 1:2 budgets), the paper's allocators
    (vision: plus GoRA), table1_cpu's search, 5 seeds, the chosen curvature statistic (not the paper's Tr(H))."""
    from lorambo.allocators.uniform import uniform_cost
    from lorambo.budget import budget_label
    from lorambo.models import adaptable_layers, build_model, build_tokenizer
    from lorambo.report.paper_tables import BUDGET_ANALOGUE

    cells = preset_cells(preset)
    assert axis(cells, "allocator") == sorted(allocators)
    assert len(axis(cells, "seed")) == 5 and sweeper_of(preset) == sweeper_of("table1_cpu")
    cfg = compose_config([f"experiment={preset}", "model.pretrain=null"])
    assert cfg.train[length[0]] == length[1] and cfg.sensitivity.curvature == "fisher_trace"
    if length[0] == "epochs":
        assert cfg.train.max_steps is None
    layers = adaptable_layers(build_model(cfg.model, cfg.task, build_tokenizer(cfg.model)), cfg.model.target_modules)
    p_max = sorted(int(b) for b in axis(cells, "budget.p_max"))
    assert p_max == [uniform_cost(layers, 2), uniform_cost(layers, 4)]
    labels = [budget_label(compose_config([f"experiment={preset}", f"budget.p_max={p}"]).budget) for p in p_max]
    assert [BUDGET_ANALOGUE[label] for label in labels] == columns


@pytest.mark.slow
def test_table2_vision_on_efficientnet_keeps_the_papers_rows_on_the_real_base():
    """EfficientNet-Lite0 with its ImageNet weights on all ten Fashion-MNIST classes: the paper's allocators plus
    GoRA, uniform r2's and r8's parameters (at r1 every allocator that gives each layer rank 1 first is uniform),
    table1_cpu's search, 3 seeds, the Fisher trace."""
    cells = preset_cells("table2_vision_effnet")
    assert axis(cells, "allocator") == sorted(["uniform", "frobenius_greedy", "hessian_offline", "hessian_online",
                                               "data_weighted", "gora"])
    assert axis(cells, "budget") == ["r2", "r8"] and len(axis(cells, "seed")) == 3
    assert sweeper_of("table2_vision_effnet") == sweeper_of("table1_cpu")
    cfg = compose_config(["experiment=table2_vision_effnet"])
    assert (cfg.model.name, cfg.task.name, cfg.task.num_labels) == ("efficientnet_lite0", "fashion_mnist", 10)
    assert cfg.model.pretrained.endswith("model.safetensors") and cfg.sensitivity.curvature == "fisher_trace"


def sweeper_of(preset):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    return {k: v for k, v in OmegaConf.to_container(cfg.hydra.sweeper).items() if k != "params"}


@pytest.mark.parametrize("preset,rows,tasks,seeds", [
    ("allocators_cpu", ["adalora", "data_weighted", "eva", "gora"], ["wiki_pairs"], 5),
    ("adarankgrad_cpu", ["adarankgrad_r2", "adarankgrad_r4", "galore_r2", "galore_r4", "lora_r4"],
     ["wiki_pairs"], 3)])  # full-FT optimizer rows: 3 seeds fit about 2 hours (the preset's comment)
@pytest.mark.slow
def test_presets_read_beside_table1_cpu_share_its_protocol(preset, rows, tasks, seeds):
    """Their rows are read beside table1_cpu's (uniform r2 and r8, Hessian, full FT): all but the row must match."""
    cells = preset_cells(preset)
    assert axis(cells, "table_row") == rows and axis(cells, "task") == tasks and len(axis(cells, "seed")) == seeds
    assert sweeper_of(preset) == sweeper_of("table1_cpu")
    for task in tasks:
        ours = compose_config([f"experiment={preset}", f"table_row={rows[0]}", f"task={task}",
                               *[o for o in cells[0] if o.startswith("budget=")]])
        theirs = compose_config(["experiment=table1_cpu", "table_row=lora_r2", f"task={task}"])
        for key in ("train", "task", "lora", "sensitivity", "model"):
            if key == "train":  # the row's own learning rate (full FT's for GaLore, AdaRankGrad) is the search's start
                ours.train.lr = theirs.train.lr
            assert ours[key] == theirs[key], key


@pytest.mark.slow
@pytest.mark.xdist_group("presets")
def test_allocators_cpu_rows_share_the_budget_of_table1_cpus_row_between_r1_and_r2():
    """Read against table1_cpu's Hessian row at 1.5 x r1 and uniform's r1-r2 curve: the same budget, whatever row."""
    theirs = compose_config(["experiment=table1_cpu", "table_row=hessian_r1x1.5", "task=wiki_pairs"])
    assert (theirs.budget.rank, theirs.budget.scale) == (1, 1.5)
    for cell, cfg in preset_configs("allocators_cpu"):
        assert cfg.budget == theirs.budget, cell


@pytest.mark.slow
@pytest.mark.xdist_group("presets")
def test_adarankgrad_rows_set_optimizer_and_rank():
    rows = set()
    for cell, cfg in preset_configs("adarankgrad_glue"):
        if cfg.method.name == "full_ft":
            rows.add((cfg.optimizer.name, cfg.optimizer.get("rank")))
        else:
            rows.add((cfg.allocator.name, cfg.budget.rank))
    assert rows == {("adamw", None), ("uniform", 4), ("uniform", 8), ("galore", 4), ("galore", 8),
                    ("adarankgrad", 4), ("adarankgrad", 8)}


def test_command_line_narrows_a_preset_axis():
    cells = preset_cells("budget_sweep", ["model=roberta", "task=qnli", "budget=r4,r8", "seed=0"])
    assert len(cells) == 8 * 2 and axis(cells, "budget") == ["r4", "r8"] and axis(cells, "seed") == ["0"]


# a row of each kind (the other rows differ from these in their budget only, which the compositions above check):
# full fine-tuning, the Hessian allocator at a scaled budget; a low-rank gradient optimizer (AdaRankGrad; GaLore is
# the same kind of row, run on the tiny models by test_runs), uniform LoRA
@pytest.mark.parametrize("preset,narrow,jobs", [
    ("table1_cpu", ["seed=0", "task=wiki_pairs", "table_row=full_ft,hessian_r1x1.5",
                    "hydra.sweeper.lr_factors=[1.0]"], 2),
    ("adarankgrad_cpu", ["seed=0", "table_row=adarankgrad_r2,lora_r4", "hydra.sweeper.lr_factors=[1.0]"], 2)])
@pytest.mark.slow
def test_cpu_preset_runs_a_row_of_each_kind_on_the_real_model(preset, narrow, jobs, tmp_path, monkeypatch, capfd):
    """The CPU preset as shipped (real MiniLM, real data, its tuned sweeper), cut to 2 steps, 32 examples of 32
    tokens and the fewest statistics batches so it fits a test."""
    result = run_here([f"experiment={preset}", *narrow, "train.max_steps=2", "task.max_train_samples=64",
                       "task.max_eval_samples=32", "task.max_length=32", *STATS_FEW, "hydra.sweep.dir=sweep"],
                      tmp_path, monkeypatch, capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.load(open(p)) for p in glob.glob(os.path.join(tmp_path, "sweep", "*", "metrics.json"))]
    assert len(runs) == jobs
    assert {r["model"] for r in runs} == {"minilm"} and all(r["steps"] == 2 for r in runs)


@pytest.mark.slow
def test_table2_lm_on_smollm2_keeps_the_papers_rows_on_the_real_base():
    """SmolLM2-135M-Instruct on the Wikipedia summaries' adaptation half: the paper's allocators plus EVA and GoRA at
    uniform r2's and r8's parameters, 3 seeds, one rate for every row (the default sweeper: no search), the Fisher
    trace, sized to this CPU (25 steps of 8 x 64 tokens)."""
    cells = preset_cells("table2_lm_smollm2")
    assert axis(cells, "allocator") == sorted(["uniform", "frobenius_greedy", "hessian_offline", "hessian_online",
                                               "data_weighted", "eva", "gora"])
    assert axis(cells, "budget") == ["r2", "r8"] and len(axis(cells, "seed")) == 3 and len(cells) == 42
    assert "lr_factors" not in sweeper_of("table2_lm_smollm2")
    cfg = compose_config(["experiment=table2_lm_smollm2"])
    assert (cfg.model.name, cfg.task.name, cfg.task.type) == ("smollm2", "wiki_adapt", "lm")
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.task.max_length) == (8, 25, 64)
    assert cfg.sensitivity.curvature == "fisher_trace"


@pytest.mark.slow
def test_llm_track_on_smollm2_compares_lorambos_allocators_with_uniform_at_two_budgets():
    """SmolLM2-135M-Instruct on the arithmetic problems: uniform and LoRAMBo's offline and online allocators at
    uniform r1's and r4's parameters, 3 seeds, one rate (no search), scored by generation, sized to this CPU."""
    cells = preset_cells("llm_track_smollm2")
    assert axis(cells, "allocator") == ["hessian_offline", "hessian_online", "uniform"]
    assert axis(cells, "budget") == ["r1", "r4"] and axis(cells, "seed") == ["0", "1", "2"] and len(cells) == 18
    assert "lr_factors" not in sweeper_of("llm_track_smollm2")
    cfg = compose_config(["experiment=llm_track_smollm2"])
    assert (cfg.model.name, cfg.task.name, cfg.task.type, cfg.task.main_metric) == (
        "smollm2", "arithmetic", "instruct", "accuracy")
    assert (cfg.train.batch_size, cfg.train.max_steps) == (8, 60)
    assert (cfg.task.max_test_samples, cfg.task.max_eval_samples, cfg.task.forgetting.max_eval_samples) == (100, 100, 64)


@pytest.mark.slow
def test_table1_on_mpnet_keeps_the_papers_rows_and_a_budget_axis_on_the_real_base():
    """all-mpnet-base-v2 on both Table 1 tasks: uniform r2, Hessian matched and at the paper's +12%, uniform r8 for
    the budget axis, 3 seeds, one rate for every row (no search), 125 steps of 16."""
    cells = preset_cells("table1_mpnet")
    assert axis(cells, "table_row") == ["hessian_matched_r2", "hessian_paper_r2", "lora_r2", "lora_r8"]
    assert axis(cells, "task") == ["rt_snippets", "wiki_pairs"] and axis(cells, "seed") == ["0", "1", "2"]
    assert len(cells) == 24 and "lr_factors" not in sweeper_of("table1_mpnet")
    cfg = compose_config(["experiment=table1_mpnet", "task=wiki_pairs", "table_row=hessian_paper_r2"])
    assert (cfg.model.name, cfg.task.max_train_samples, cfg.task.max_eval_samples, cfg.train.epochs) == (
        "mpnet", 2000, 1000, 1)
    assert (cfg.allocator.name, cfg.budget.scale) == ("hessian_offline", 1.12)
