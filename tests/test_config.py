"""Every model composes with every task of its family; the rest are refused with a one-line reason."""

import os

import pytest
from omegaconf import OmegaConf

from lorambo.cli import group_options
from lorambo.errors import LoramboError
from lorambo.models import FAMILY_TASK_TYPES, check_model_fits_task
from tests.helpers import compose_cfg, run_main

MODELS = group_options("model")
TASKS = group_options("task")
PAIRS = [(m, t) for m in MODELS for t in TASKS]


def test_groups_hold_what_the_paper_needs():
    assert {"bert", "roberta", "t5", "gpt2", "resnet50", "minilm"} <= set(MODELS)
    assert {"tiny_bert", "tiny_roberta", "tiny_t5", "tiny_gpt2", "tiny_resnet"} <= set(MODELS)
    assert {"qnli", "sst2", "mnli", "cola", "stsb", "mrpc", "rte", "qqp", "wikitext103", "imagenet1k",
            "rt_snippets", "wiki_summaries", "fashion_mnist", "local_file"} <= set(TASKS)
    assert {"uniform", "hessian_offline", "hessian_online"} <= set(group_options("allocator"))
    assert {"lora", "dora", "growth", "adalora", "ard_lora", "full_ft"} <= set(group_options("method"))
    assert {"6M", "12M", "24M", "r4", "r8"} <= set(group_options("budget"))
    assert {"wandb_offline", "wandb", "none"} <= set(group_options("logger"))


def test_default_is_the_offline_default():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.task.name, cfg.allocator.name, cfg.logger.mode) == (
        "minilm", "rt_snippets", "uniform", "offline")


def paired(model, task):
    """The config of model=MODEL task=TASK, from the two composed once each: a model's and a task's configs fill
    their own groups only (no _global_ package), so the pair is the model's config with the task's group in it
    (test_a_pair_assembled_is_the_pair_composed checks that on pairs of every family)."""
    cfg = compose_cfg([f"model={model}"])
    cfg.task = compose_cfg([f"task={task}"]).task
    return cfg


@pytest.mark.parametrize("model,task", [("bert", "qnli"), ("gpt2", "wikitext103"), ("resnet50", "imagenet1k"),
                                        ("tiny_llama", "arithmetic"), ("t5", "stsb"), ("roberta", "fashion_mnist")])
def test_a_pair_assembled_is_the_pair_composed(model, task):
    assert paired(model, task) == compose_cfg([f"model={model}", f"task={task}"])


@pytest.mark.parametrize("model,task", PAIRS)
def test_every_model_task_pair_composes_or_is_refused(model, task):
    cfg = paired(model, task)
    # every value resolves (a local_file task's path is the user's to give: left missing, ???)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["model"]["name"] == model and container["task"]["name"] == task
    assert isinstance(container["train"]["lr"], float)
    if cfg.task.type in FAMILY_TASK_TYPES[cfg.model.family]:
        check_model_fits_task(cfg.model, cfg.task)
        for key in ("metrics", "main_metric", "max_train_samples", "max_eval_samples"):
            assert key in cfg.task
    else:
        with pytest.raises(LoramboError, match="does not fit model"):
            check_model_fits_task(cfg.model, cfg.task)


@pytest.mark.slow
def test_every_text_and_vision_family_has_tasks():
    families = {compose_cfg([f"model={m}"]).model.family for m in MODELS}
    types = {compose_cfg([f"task={t}"]).task.type for t in TASKS}
    for family in families:
        assert FAMILY_TASK_TYPES[family] & types, family


def test_full_ft_uses_the_models_full_ft_lr():
    cfg = compose_cfg(["model=roberta", "method=full_ft"])
    assert cfg.train.lr == cfg.model.full_ft_lr != cfg.model.lr


def test_mnli_reports_matched_and_mismatched():
    cfg = compose_cfg(["task=mnli"])
    assert dict(cfg.task.eval_splits) == {"matched": "validation_matched", "mismatched": "validation_mismatched"}
    assert cfg.task.dataset.name == "mnli"


@pytest.mark.parametrize("args", [
    ["model=roberta", "task=qnli", "allocator=uniform", "budget=r4"],
    ["model=t5", "task=mnli", "method=full_ft"],
    ["model=gpt2", "task=wikitext103", "budget=12M"],
    ["model=resnet50", "task=imagenet1k", "budget=6M"],
    ["model=bert", "task=cola", "budget=r8", "logger=wandb"],
])
@pytest.mark.slow
def test_cli_prints_the_job_config_offline(args, tmp_path, monkeypatch, capfd):
    code, out, err = run_main([*args, "--cfg", "job"], tmp_path, monkeypatch, capfd)
    assert code == 0, err
    model = [a for a in args if a.startswith("model=")][0].split("=")[1]
    assert f"name: {model}" in out and not os.listdir(tmp_path)  # printed, nothing run
