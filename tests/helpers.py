import copy
import functools
import os
import subprocess
import sys

import torch
from omegaconf import OmegaConf
from torch import nn

import lorambo  # noqa: F401
from lorambo.config import compose_config


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple):
    return compose_config(overrides)


def compose_cfg(overrides=()):
    """compose_config(overrides), composed once per distinct list (Hydra's compose costs about 0.3 s here, and the
    tests compose the same lists many times); each caller gets its own copy, free to change."""
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.lru_cache(maxsize=None)
def preset_configs(preset: str) -> tuple:
    """((cell, cfg), ...) for every distinct cell of a preset but its seed, each composed once per process: the
    preset tests read the same few hundred compositions (marked `xdist_group("presets")` so that one worker
    composes them). The configs are shared: read them, do not change them."""
    from lorambo.config import preset_cells

    cells = dict.fromkeys(tuple(o for o in c if not o.startswith("seed=")) for c in preset_cells(preset))
    return tuple((cell, _composed(cell)) for cell in cells)


def run_in_process(overrides, run_dir):
    """A run through the same `run` the CLI calls, without a subprocess (faster)."""
    from lorambo.train import run

    os.makedirs(run_dir, exist_ok=True)
    return run(compose_cfg(["logger=none", *overrides]), str(run_dir))


def run_cli(args, cwd, timeout=600, env=None, program="lorambo-run"):
    """`lorambo-run ARGS` (or another of lorambo's commands) as a user runs it, from `cwd` (with `env`, a
    changed environment)."""
    exe = os.path.join(os.path.dirname(sys.executable), program)
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def run_main(args, cwd, monkeypatch, capfd, program="lorambo-run"):
    """(exit code, stdout, stderr) of `lorambo-run ARGS` (or `lorambo-allocate`, `lorambo-report`) in `cwd`, through
    the function
    the script calls, in this process (a subprocess per case costs seconds of interpreter and torch start-up)."""
    from lorambo import report
    from lorambo.cli import allocate_main, main

    monkeypatch.chdir(cwd)
    entry = {"lorambo-run": main, "lorambo-allocate": allocate_main, "lorambo-report": report.main}[program]
    return call_main(entry, [program, *args], monkeypatch, capfd)


def call_main(entry, argv, monkeypatch, capture):
    """(exit code, stdout, stderr) of a script's main() called in this process with sys.argv = argv; `capture` is
    pytest's capfd or capsys."""
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    try:
        entry()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capture.readouterr()
    return code, out, err


def write_csv_splits(folder, header, make_row, sizes: dict, seed: int = 0):
    """A local copy of a hub dataset (what task.dataset.path reads): one CSV per split, each row from
    make_row(rng), `sizes` rows per split."""
    import csv
    import random

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for split, n in sizes.items():
        with open(os.path.join(folder, f"{split}.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for _ in range(n):
                writer.writerow(make_row(rng))
    return folder


# --- tiny runs: the model families, a short run's settings, and what a run is checked against

QUICK = ["train.max_steps=6", "train.log_every=3", "train.batch_size=8", "train.eval_batch_size=32",
         "task.max_train_samples=64", "task.max_eval_samples=48", "train.eval_every=3"]
SMALL_DATA = ["task.max_train_samples=64", "task.max_eval_samples=16", "train.batch_size=8"]
STATS_FEW = ["sensitivity.gradient_batches=2", "sensitivity.hessian_batches=1", "sensitivity.covariance_batches=2",
             "sensitivity.fisher_batches=2", "sensitivity.eva_tau=0.0", "sensitivity.eva_rho=1"]
FAST = [*QUICK, "train.eval_every=0", "budget=r4", *STATS_FEW]  # a run with statistics, few batches each

FAMILIES = {  # the tiny model of every family lorambo adapts, with a task it fits
    "tiny_bert": ["model=tiny_bert", "task=rt_snippets"],
    "tiny_roberta": ["model=tiny_roberta", "task=local_file", "task.text_fields=[premise,hypothesis]"],
    "tiny_t5": ["model=tiny_t5", "task=rt_snippets"],
    "tiny_gpt2": ["model=tiny_gpt2", "task=wiki_summaries", "task.max_length=32"],
    "tiny_resnet": ["model=tiny_resnet", "task=fashion_mnist"],
    "tiny_llama": ["model=tiny_llama", "task=wiki_summaries", "task.max_length=32"],
    "tiny_qwen2": ["model=tiny_qwen2", "task=wiki_summaries", "task.max_length=32"],
    "tiny_mistral": ["model=tiny_mistral", "task=rt_snippets"],
    "tiny_deberta_v3": ["model=tiny_deberta_v3", "task=rt_snippets"],
}


def family_overrides(family, pair_csv) -> list[str]:
    """FAMILIES[family], with the local file (the `pair_csv` fixture) where its task reads one."""
    overrides = list(FAMILIES[family])
    return [*overrides, f"task.path={pair_csv}"] if "task=local_file" in overrides else overrides


def saved_lora_params(run_dir) -> int:
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    return sum(t.numel() for name, t in tensors.items() if "lora_" in name)


def built(overrides):
    """(cfg with family and modules resolved, the base model of seed 0) as a run builds them."""
    import torch

    from lorambo.models import build_model, build_tokenizer, resolve_auto_modules, resolve_family

    cfg = compose_cfg(["logger=none", *overrides])  # run_in_process's composition (the logger aside): cached
    resolve_family(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, build_tokenizer(cfg.model) if cfg.model.family != "vision" else None)
    resolve_auto_modules(cfg.model, model)
    return cfg, model


def evaluate_independently(cfg, model) -> dict:
    """Metric of `model` on the validation split, computed here without lorambo's evaluation loop."""
    import numpy as np
    import torch

    from lorambo.data import load_task
    from lorambo.models import build_tokenizer

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
    """The saved base model, as a user would reload it."""
    import torch

    from lorambo.models import build_model

    if cfg.model.family == "vision":
        torch.manual_seed(1)  # a different init: the loaded state must be what counts
        model = build_model(cfg.model, cfg.task, None)
        model.load_state_dict(torch.load(os.path.join(run_dir, "base_model", "model.pt")))
        return model
    return _from_folder(cfg, os.path.join(run_dir, "base_model"))


def run_and_check(overrides, run_dir, base_dir=None, round_trip=True):
    """A run; its parameter counts against the saved adapter and the layers found (LoRA, DoRA's magnitudes,
    AdaLoRA's singular values, ARD-LoRA's PEFT form); the budget; and (`round_trip`) the PEFT round trip: the
    saved adapter on the reloaded base reproduces the reported metric."""
    import pytest
    from peft import PeftModel

    from lorambo.methods.adalora import adalora_target_rank
    from lorambo.models import adaptable_layers

    metrics = run_in_process(overrides, run_dir)
    cfg, base = built(overrides)
    layers = {l.name: l for l in adaptable_layers(base, cfg.model.target_modules)}
    assert set(metrics["ranks"]) <= set(layers)
    per_rank = 1 if metrics["method"] == "adalora" else 0  # AdaLoRA: a singular value per rank
    dora = sum(layers[n].d_out for n in metrics["ranks"]) if metrics["method"] == "dora" else 0
    if metrics["method"] == "ard_lora":  # per-head ranks: the file holds PEFT's form, rank max_h r_h per layer
        assert saved_lora_params(run_dir) == metrics["adapter_params_peft_form"] == sum(
            r * layers[n].cost for n, r in metrics["ranks"].items())
    else:
        assert metrics["adapter_params"] == saved_lora_params(run_dir) == sum(
            r * (layers[n].cost + per_rank) for n, r in metrics["ranks"].items()) + dora
    if metrics["method"] == "adalora":  # it controls total rank, not parameters: its final pattern decides those
        assert sum(metrics["ranks"].values()) == len(layers) * adalora_target_rank(list(layers.values()),
                                                                                   metrics["p_max"])
    else:
        assert metrics["adapter_params"] <= metrics["p_max"]
    assert metrics["head_params"] == sum(p.numel() for h in cfg.model.head_modules
                                         for p in base.get_submodule(h).parameters())
    if not round_trip:
        return metrics
    base = load_base(cfg, run_dir) if base_dir is None else _from_folder(cfg, base_dir)
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    for key, value in evaluate_independently(cfg, reloaded).items():
        assert value == pytest.approx(metrics[key], rel=1e-4), key
    return metrics


def _from_folder(cfg, folder):
    """A Hugging Face base saved in `folder`, loaded as its family's auto class."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if cfg.model.family == "causal_lm" else AutoModelForSequenceClassification
    return auto.from_pretrained(folder)


# --- a model of three layers (a convolution and two linears) for the adapter surgery's tests

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.relu(self.conv(x)).flatten(1))))


LORA = OmegaConf.create({"alpha": 8, "dropout": 0.0, "scaling": "per_layer"})  # LoRA settings for Tiny


def run_here(args, cwd, monkeypatch, capfd, program="lorambo-run"):
    """run_main's result in run_cli's form (returncode, stdout, stderr): a command's test in this process."""
    code, out, err = run_main(args, cwd, monkeypatch, capfd, program)
    return subprocess.CompletedProcess([program, *args], code, out, err)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port no process listens on now: torchrun's rendezvous (two tests' fixed ports collided under xdist)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_script(name):
    """bench/NAME.py loaded as a module (the benchmark scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
