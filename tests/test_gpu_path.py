"""What a user on a CUDA GPU with the hub hits first, checked on this CPU machine: each test fails on the code
before its fix (the regression named in its docstring)."""

import pytest
import torch
from omegaconf import OmegaConf

from lorambo import devices, models
from lorambo.cli import group_options
from lorambo.config import compose_config, preset_cells

PRESETS = [p for p in group_options("experiment") if p != "smoke"]


def fake_gpu(monkeypatch, bf16_units: bool):
    """torch.cuda as a GPU reports itself: is_bf16_supported() is True through emulation on pre-Ampere GPUs,
    and only including_emulation=False says whether the hardware has bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: bf16_units or including_emulation)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_full_fine_tuning_row_trains_float32_weights_at_its_own_rate(preset, monkeypatch):
    """Regression: adalora_glue's global `train.lr: ${task.adalora_recipe.lr}` made its full-FT row train at
    the adapter rates, and base_dtype auto made that base bf16 under AdamW."""
    fake_gpu(monkeypatch, bf16_units=True)
    cells = {tuple(o for o in c if not o.startswith("seed=")) for c in preset_cells(preset)}
    full_ft = [(cell, cfg) for cell, cfg in ((c, compose_config(list(c))) for c in cells)
               if cfg.method.name == "full_ft"]
    for cell, cfg in full_ft:
        assert cfg.train.lr == cfg.model.full_ft_lr, cell
        assert models.base_dtype(cfg.model, trains_base=True) == torch.float32
    if preset == "adalora_glue":
        assert full_ft
        rte = compose_config(["experiment=adalora_glue", "task=rte", "table_row=full_ft"])
        lora = compose_config(["experiment=adalora_glue", "task=rte", "table_row=lora_r2"])
        assert rte.train.lr == 2e-5 and lora.train.lr == lora.task.adalora_recipe.lr != 2e-5


def test_a_full_fine_tuning_base_loads_in_float32_where_adapters_get_bf16(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, bf16_units=True)
    cfg = compose_config(["model=tiny_llama", "model.base_dtype=auto", "task=wiki_summaries"])
    models.resolve_family(cfg)
    assert models.base_dtype(cfg.model) == torch.bfloat16
    model = models.build_model(cfg.model, cfg.task, models.build_tokenizer(cfg.model), trains_base=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_auto_precision_is_bf16_only_where_the_gpu_has_bf16_units(monkeypatch):
    """Regression: torch.cuda.is_bf16_supported() (emulation included) made a V100 or T4 train in emulated bf16;
    without bf16 units auto is fp16 (accelerate scales the loss) and the frozen base stays float32."""
    fake_gpu(monkeypatch, bf16_units=False)
    assert devices.resolve_mixed_precision("auto") == "fp16"
    assert models.base_dtype(compose_config(["model=llama"]).model) == torch.float32
    fake_gpu(monkeypatch, bf16_units=True)
    assert devices.resolve_mixed_precision("auto") == "bf16"
    assert models.base_dtype(compose_config(["model=llama"]).model) == torch.bfloat16


def test_full_fine_tuning_refuses_a_quantised_base():
    from lorambo.errors import LoramboError

    cfg = compose_config(["model=tiny_llama", "task=wiki_summaries", "model.quantize=4bit"])
    models.resolve_family(cfg)
    with pytest.raises(LoramboError, match="full fine-tuning cannot train"):
        models.build_model(cfg.model, cfg.task, models.build_tokenizer(cfg.model), trains_base=True)


def test_metrics_say_which_precision_and_base_dtype_ran(tmp_path):
    from tests.helpers import run_in_process

    metrics = run_in_process(["experiment=smoke", "train.max_steps=2", "task.max_train_samples=32",
                              "task.max_eval_samples=16", "train.mixed_precision=no"], tmp_path)
    assert metrics["mixed_precision"] == "no" and metrics["base_dtype"] == "float32"
    assert metrics["quantize"] is None
    assert OmegaConf.create(metrics)  # plain JSON values
