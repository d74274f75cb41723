"""Bases pretrained here for the CPU tables: disjoint pretraining and adaptation data, a pretraining run done
once and cached, and the adapted model starting from those weights."""

import hashlib
import json
import os
import shlex

import numpy as np
import pytest
import torch

from lorambo.config import compose_config
from lorambo.data import _text_splits, load_task
from lorambo.models import build_model, build_tokenizer
from lorambo.pretrain import base_path
from tests.helpers import run_here

SMALL = ["model=small_gpt2_wiki", "task=wiki_adapt", "++model.hf_config.n_layer=1", "++model.hf_config.n_embd=32",
         "++model.hf_config.n_head=2",
         "model.pretrain.overrides=['task=wiki_pretrain','train.max_steps=3','task.max_train_samples=16',"
         "'task.max_eval_samples=8','task.max_length=32','train.batch_size=4','seed=0']"]


@pytest.mark.slow
def test_pretraining_and_adaptation_halves_are_disjoint():
    texts = {}
    for task in ("wiki_pretrain", "wiki_adapt", "wiki_summaries"):
        raw = _text_splits(compose_config([f"task={task}"]).task)
        texts[task] = set(raw["train"]["text"]) | set(raw["validation"]["text"])
    assert not texts["wiki_pretrain"] & texts["wiki_adapt"]
    assert texts["wiki_pretrain"] | texts["wiki_adapt"] == texts["wiki_summaries"]


def test_fashion_mnist_class_split_relabels():
    cfg = compose_config(["model=small_resnet_fmnist", "task=fmnist_adapt"])
    data = load_task(cfg.task, cfg.model, None)
    labels = np.array(data.train.labels)
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3, 4] and len(labels) == 30000  # 6,000 per class
    # relabelled in order: new 0 is the old class 5 (sandal): the same images as the full set's class 5
    full = load_task(compose_config(["task=fashion_mnist"]).task, cfg.model, None)
    old = np.array(full.train.labels)
    assert np.array_equal(data.train.images[labels == 0], full.train.images[old == 5])


@pytest.mark.slow
def test_base_is_pretrained_once_cached_and_loaded(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LORAMBO_CACHE", str(tmp_path / "cache"))
    args = [*SMALL, "logger=none", "train.max_steps=2", "task.max_train_samples=16", "task.max_eval_samples=8",
            "task.max_length=32", "train.batch_size=4"]
    first = run_here([*args, "hydra.run.dir=first"], tmp_path, monkeypatch, capfd)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pretraining the base small_gpt2_wiki once" in first.stderr
    second = run_here([*args, "hydra.run.dir=second"], tmp_path, monkeypatch, capfd)
    assert second.returncode == 0 and "pretraining the base" not in second.stderr  # cached
    cfg = compose_config(SMALL)
    base = base_path(cfg.model)
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(base), os.path.basename(base) + ".lock"]
    # the adapted model starts from the pretrained weights, not from a fresh initialisation
    tokenizer = build_tokenizer(cfg.model)
    loaded = build_model(cfg.model, cfg.task, tokenizer)
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(os.path.join(base, "model"))
    torch.manual_seed(123)
    fresh = build_model(compose_config([*SMALL, "model.pretrain=null"]).model, cfg.task, tokenizer)
    name = "transformer.h.0.attn.c_attn.weight"
    weight = lambda m: dict(m.named_parameters())[name]
    assert torch.equal(weight(loaded), weight(saved)) and not torch.equal(weight(loaded), weight(fresh))
    # every run on the base records its checksum and the libraries' versions: what the same numbers need
    with open(os.path.join(base, "model", "model.safetensors"), "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("first", "second")]
    assert [m["base_sha256"] for m in metrics] == [expected, expected]
    assert metrics[0]["versions"]["torch"] == torch.__version__
    # pretraining is deterministic: its command, run again (here, in this process: a pretraining in a fresh one
    # costs 15 s of imports), makes bit-identical weights
    command = next(line for line in first.stderr.splitlines() if "pretraining the base" in line)
    again = [a for a in shlex.split(command.split(": lorambo-run ", 1)[1]) if not a.startswith("hydra.run.dir=")]
    rerun = run_here([*again, "hydra.run.dir=again"], tmp_path, monkeypatch, capfd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with open(tmp_path / "again" / "model" / "model.safetensors", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == expected
