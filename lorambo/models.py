"""Building base models (hub id, local path, or a config with no download) and finding adaptable layers."""

import os
import re

import torch
from torch import nn

from lorambo.budget import LayerSpec
from lorambo.errors import LoramboError

# Which task types each model family can run.
FAMILY_TASK_TYPES = {
    "encoder": {"classification", "regression"},
    "t5": {"classification", "regression"},  # T5ForSequenceClassification: see README, "T5"
    "causal_lm": {"lm"},
    "vision": {"image_classification"},
}


def check_model_fits_task(model_cfg, task_cfg) -> None:
    if model_cfg.family not in FAMILY_TASK_TYPES:
        raise LoramboError(f"model.family '{model_cfg.family}' unknown; use one of {sorted(FAMILY_TASK_TYPES)}")
    if task_cfg.type not in FAMILY_TASK_TYPES[model_cfg.family]:
        fitting = {"classification": "bert, roberta, t5, minilm", "regression": "bert, roberta, t5, minilm",
                   "lm": "gpt2, tiny_gpt2", "image_classification": "resnet50, tiny_resnet"}[task_cfg.type]
        raise LoramboError(
            f"task '{task_cfg.name}' ({task_cfg.type}) does not fit model '{model_cfg.name}' "
            f"({model_cfg.family}); use a model such as: {fitting}"
        )


def build_tokenizer(model_cfg):
    if model_cfg.family == "vision":
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer)
    if tokenizer.pad_token is None:  # GPT-2 has none; its blocks are never padded, eos is a safe filler
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(model_cfg, task_cfg, tokenizer) -> nn.Module:
    """The base model, from the hub or a local path (`pretrained`), from `hf_config` with no download, or
    pretrained here first (`pretrain`, lorambo/pretrain.py)."""
    if model_cfg.get("pretrain"):
        from omegaconf import OmegaConf

        from lorambo.pretrain import ensure_pretrained

        model_cfg = OmegaConf.merge(model_cfg, {"pretrained": ensure_pretrained(model_cfg), "pretrain": None})
    if model_cfg.family == "vision":
        return _build_timm(model_cfg, task_cfg)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if model_cfg.family == "causal_lm" else AutoModelForSequenceClassification
    extra = {}
    if model_cfg.family != "causal_lm":
        extra["num_labels"] = task_cfg.num_labels
        if task_cfg.type == "regression":
            extra["problem_type"] = "regression"
    if model_cfg.pretrained:
        try:
            model = auto.from_pretrained(model_cfg.pretrained, **extra)
        except OSError as e:
            raise LoramboError(f"cannot load model.pretrained='{model_cfg.pretrained}': {str(e).splitlines()[0]}")
    else:
        hf_config = dict(model_cfg.hf_config)
        model_type = hf_config.pop("model_type")
        if tokenizer is not None:  # a config-built model shares the tokenizer's vocabulary and specials
            hf_config.setdefault("vocab_size", len(tokenizer))
            hf_config.setdefault("pad_token_id", tokenizer.pad_token_id)
            if model_cfg.family == "t5":
                hf_config.setdefault("eos_token_id", tokenizer.sep_token_id or tokenizer.eos_token_id)
                hf_config.setdefault("decoder_start_token_id", tokenizer.pad_token_id)
        config = AutoConfig.for_model(model_type, **hf_config, **extra)
        model = auto.from_config(config)
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _build_timm(model_cfg, task_cfg) -> nn.Module:
    import timm

    pretrained = model_cfg.pretrained
    kwargs = dict(model_cfg.get("timm_kwargs") or {})
    if pretrained and pretrained != "hub":  # a local weights file instead of the hub
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained))
    try:
        return timm.create_model(model_cfg.timm_name, pretrained=bool(pretrained), num_classes=task_cfg.num_labels,
                                 in_chans=model_cfg.in_chans, **kwargs)
    except (OSError, RuntimeError) as e:
        raise LoramboError(f"cannot load timm model '{model_cfg.timm_name}' (pretrained={pretrained}): "
                           f"{str(e).splitlines()[0]}")


def adaptable_layers(model: nn.Module, target_modules: str) -> list[LayerSpec]:
    """Every Linear, GPT-2 Conv1D or Conv2d whose full name matches the model config's regex."""
    from transformers.pytorch_utils import Conv1D

    pattern = re.compile(target_modules)
    layers = []
    for name, module in model.named_modules():
        if not pattern.search(name):
            continue
        if isinstance(module, nn.Linear):
            layers.append(LayerSpec(name, module.out_features, module.in_features, "linear"))
        elif isinstance(module, Conv1D):  # weight is (in, out)
            layers.append(LayerSpec(name, module.weight.shape[1], module.weight.shape[0], "conv1d"))
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise LoramboError(f"grouped convolution {name} cannot carry LoRA; narrow model.target_modules")
            c_out, c_in, kh, kw = module.weight.shape
            layers.append(LayerSpec(name, c_out, c_in * kh * kw, "conv2d"))
    if not layers:
        raise LoramboError(f"model.target_modules '{target_modules}' matches no Linear/Conv layer of the model")
    return layers


def head_parameters(model: nn.Module, head_modules) -> list[torch.nn.Parameter]:
    params = []
    for name in head_modules:
        params += list(model.get_submodule(name).parameters())
    return params


def save_base_model(model, model_cfg, run_dir: str) -> None:
    path = os.path.join(run_dir, "base_model")
    if model_cfg.family == "vision":
        os.makedirs(path, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(path, "model.pt"))
    else:
        model.save_pretrained(path)


def name_labels(model, names: list[str]) -> None:
    """id2label / label2id in the model's config: the base model and the adapter's config.json carry them."""
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
