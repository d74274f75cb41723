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


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An ImageFolder as ImageNet has it: JPEGs in RGB, CMYK and greyscale (L), two classes, two splits."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("validation", 12)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n // 2):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=rng, dtype=torch.uint8).numpy()
                image = Image.fromarray(pixels, "RGB")
                image = {0: image, 1: image.convert("CMYK"), 2: image.convert("L")}[i % 3]
                image.save(folder / f"{i}.jpg")
    return str(root)


IMAGES = ["model=tiny_resnet", "task=imagenet1k", "task.num_labels=2", "model.in_chans=3",
          "model.mean=[0.5,0.5,0.5]", "model.std=[0.25,0.25,0.25]", "model.image_size=16"]


def test_cmyk_and_greyscale_jpegs_become_three_channels(image_folder):
    """Regression: a CMYK JPEG reached the 3-channel Normalize with 4 channels."""
    from PIL import Image

    from lorambo.data import load_task

    modes = {Image.open(p).mode for p in __import__("glob").glob(f"{image_folder}/train/*/*.jpg")}
    assert modes == {"RGB", "CMYK", "L"}
    cfg = compose_config([*IMAGES, f"task.data_dir={image_folder}"])
    data = load_task(cfg.task, cfg.model, None, seed=0)
    for dataset in (data.train, data.evals["validation"]):
        shapes = {tuple(dataset[i]["pixel_values"].shape) for i in range(len(dataset))}
        assert shapes == {(3, 16, 16)}


def test_any_number_of_loader_workers_gives_the_same_run(image_folder, tmp_path):
    """Decoding in workers (train.num_workers) changes nothing but the speed: the same losses and metric for
    the same seed with augmentation on (each image's crop and flip seeded by seed, epoch and index)."""
    import json

    from tests.helpers import run_in_process

    def losses(run_dir):
        with open(run_dir / "metrics_log.jsonl") as f:
            return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]

    common = [*IMAGES, f"task.data_dir={image_folder}", "logger=none", "train.batch_size=4", "train.epochs=2",
              "train.log_every=1", "train.mixed_precision=no"]
    runs = {n: run_in_process([*common, f"train.num_workers={n}"], tmp_path / f"w{n}") for n in (0, 2)}
    assert runs[0]["steps"] == 12 and losses(tmp_path / "w0") == losses(tmp_path / "w2")
    assert runs[0]["accuracy"] == runs[2]["accuracy"]
    repeat = run_in_process([*common, "train.num_workers=0", "seed=1"], tmp_path / "seed1")
    assert losses(tmp_path / "seed1") != losses(tmp_path / "w0")  # the augmentation does follow the seed


def test_loaders_pin_memory_and_use_workers_only_on_a_gpu(monkeypatch):
    from lorambo import data as data_module

    cfg = compose_config(["experiment=smoke"])
    task = data_module.TaskData(list(range(64)), {"validation": list(range(8))}, None)
    train, _ = data_module.data_loaders(cfg, task)
    assert train.num_workers == 0 and not train.pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "machine_cores", lambda: 16)
    train, evals = data_module.data_loaders(cfg, task, processes=2)
    assert train.num_workers == 7 and train.pin_memory and evals["validation"].num_workers == 7
