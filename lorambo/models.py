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
    "causal_lm": {"lm", "instruct"},
    "vision": {"image_classification"},
    "auto": {"classification", "regression", "lm", "instruct"},  # model=hf and the new families: resolve_family
}


AUTO = "auto"  # model.family / target_modules / head_modules: found from the model itself (model=hf)


def resolve_family(cfg) -> None:
    """model.family=auto: the family the task needs, checked against the model's own config (read without its
    weights): a causal LM for a language-modelling task, else a sequence classifier (encoder-decoder: "t5")."""
    if cfg.model.family != AUTO:
        return
    if not cfg.model.pretrained and not cfg.model.get("hf_config"):
        raise LoramboError(f"model={cfg.model.name} needs model.pretrained=ORG/NAME (a hub id) or a local folder")
    config = hf_config(cfg.model)
    if cfg.task.type in ("lm", "instruct"):
        if config.is_encoder_decoder:
            raise LoramboError(f"task '{cfg.task.name}' ({cfg.task.type}) needs a decoder-only model; model.pretrained="
                               f"'{cfg.model.pretrained}' is an encoder-decoder ({config.model_type})")
        cfg.model.family = "causal_lm"
    elif cfg.task.type in ("classification", "regression"):
        cfg.model.family = "t5" if config.is_encoder_decoder else "encoder"
    else:
        raise LoramboError(f"task '{cfg.task.name}' ({cfg.task.type}) needs a vision model; model "
                           f"'{cfg.model.name}' is a Hugging Face text model")


# Models the hub moved under their organisations; the old ids redirect today, but a redirect can go, and a
# run's record should name the repository it loaded
CURRENT_HUB_IDS = {
    **{name: f"google-bert/{name}" for name in ("bert-base-uncased", "bert-base-cased", "bert-large-uncased",
                                                "bert-large-cased", "bert-base-multilingual-cased")},
    **{name: f"FacebookAI/{name}" for name in ("roberta-base", "roberta-large", "xlm-roberta-base",
                                               "xlm-roberta-large")},
    **{name: f"google-t5/{name}" for name in ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b")},
    **{name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    "distilgpt2": "distilbert/distilgpt2",
    **{name: f"distilbert/{name}" for name in ("distilbert-base-uncased", "distilbert-base-cased")},
}


def hub_id(name):
    """A legacy hub id as the hub names it now; anything else (an ORG/NAME id, a local folder) as given."""
    name = str(name) if name is not None else None
    return CURRENT_HUB_IDS.get(name, name) if name and not os.path.exists(name) else name


def from_hub(loader, name, what: str, model_cfg, **kwargs):
    """`loader.from_pretrained(name)` with the hub's failures as one line each: a gated model (log in), custom
    code (model.trust_remote_code), anything else (the id or the folder)."""
    if str(name).startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(str(name))):
        raise LoramboError(f"{what}='{name}' is no folder here; give the folder the model was saved in (or a hub "
                           f"id, ORG/NAME)")
    try:
        return loader.from_pretrained(hub_id(name), trust_remote_code=bool(model_cfg.get("trust_remote_code")),
                                      **kwargs)
    except (OSError, ValueError) as e:  # ValueError: custom code refused, or no such head for the architecture
        message = str(e)
        first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        if "gated repo" in message or "restricted" in message and "access" in message:
            raise LoramboError(f"{what} '{name}' is a gated model: accept its licence on its hub page, then log "
                               f"in with `huggingface-cli login` (or set HF_TOKEN)") from None
        if "trust_remote_code" in message:
            raise LoramboError(f"{what} '{name}' needs its own code from the hub to load; if you trust it, set "
                               f"model.trust_remote_code=true") from None
        raise LoramboError(f"cannot load {what}='{name}': {first}") from None


def hf_config(model_cfg, defaults=None, overrides=None):
    """The transformers config of `pretrained` (hub id or local folder) or of `hf_config` (no download); for the
    latter, `defaults` fill settings that hf_config leaves out and `overrides` replace them."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    if model_cfg.pretrained:
        return from_hub(AutoConfig, model_cfg.pretrained, "model.pretrained", model_cfg)
    # to_container: a list value (DeBERTa's pos_att_type) must reach transformers as a list, not a ListConfig
    settings = {**(defaults or {}), **OmegaConf.to_container(model_cfg.hf_config, resolve=True), **(overrides or {})}
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def tokenizer_settings(model_cfg, tokenizer) -> dict:
    """A config-built model shares the tokenizer's vocabulary and special tokens."""
    if tokenizer is None:
        return {}
    settings = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if model_cfg.family == "t5":
        settings["eos_token_id"] = tokenizer.sep_token_id or tokenizer.eos_token_id
        settings["decoder_start_token_id"] = tokenizer.pad_token_id
    return settings


def check_model_fits_task(model_cfg, task_cfg) -> None:
    if model_cfg.family not in FAMILY_TASK_TYPES:
        raise LoramboError(f"model.family '{model_cfg.family}' unknown; use one of {sorted(FAMILY_TASK_TYPES)}")
    if task_cfg.type not in FAMILY_TASK_TYPES[model_cfg.family]:
        fitting = {"classification": "bert, roberta, t5, minilm, mpnet, deberta_v3, llama, hf",
                   "regression": "bert, roberta, t5, minilm, mpnet, deberta_v3, llama, hf",
                   "lm": "smollm2, gpt2, llama, qwen2, mistral, hf",
                   "instruct": "smollm2, gpt2, llama, qwen2, mistral, hf",
                   "image_classification": "efficientnet_lite0, resnet50, tiny_resnet"}[task_cfg.type]
        raise LoramboError(
            f"task '{task_cfg.name}' ({task_cfg.type}) does not fit model '{model_cfg.name}' "
            f"({model_cfg.family}); use a model such as: {fitting}"
        )


def build_tokenizer(model_cfg):
    if model_cfg.family == "vision":
        return None
    from transformers import AutoTokenizer

    tokenizer = from_hub(AutoTokenizer, model_cfg.tokenizer, "model.tokenizer", model_cfg)
    if tokenizer.pad_token is None:  # GPT-2 has none; its blocks are never padded, eos is a safe filler
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(model_cfg, task_cfg, tokenizer, trains_base: bool = False) -> nn.Module:
    """The base model, from the hub or a local path (`pretrained`), from `hf_config` with no download, or
    pretrained here first (`pretrain`, lorambo/pretrain.py). `trains_base` (full fine-tuning): float32 weights,
    never quantised."""
    if trains_base and model_cfg.get("quantize"):
        raise LoramboError(f"model.quantize={model_cfg.quantize} makes the base frozen 4-bit weights, which full "
                           f"fine-tuning cannot train; drop model.quantize (or train an adapter)")
    if model_cfg.get("pretrain"):
        from omegaconf import OmegaConf

        from lorambo.pretrain import ensure_pretrained

        model_cfg = OmegaConf.merge(model_cfg, {"pretrained": ensure_pretrained(model_cfg), "pretrain": None})
    if model_cfg.family == "vision":
        return _build_timm(model_cfg, task_cfg)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if model_cfg.family == "causal_lm" else AutoModelForSequenceClassification
    extra = {"dtype": base_dtype(model_cfg, trains_base)}
    if model_cfg.get("quantize"):
        extra["quantization_config"] = four_bit_config(model_cfg)
    if model_cfg.family != "causal_lm":
        extra["num_labels"] = task_cfg.num_labels
        if task_cfg.type == "regression":
            extra["problem_type"] = "regression"
    if model_cfg.pretrained:
        model = from_hub(auto, model_cfg.pretrained, "model.pretrained", model_cfg, **extra)
    else:
        dtype = extra.pop("dtype")
        if extra.pop("quantization_config", None) is not None:
            raise LoramboError("model.quantize needs pretrained weights to quantise; set model.pretrained")
        config = hf_config(model_cfg, defaults=tokenizer_settings(model_cfg, tokenizer), overrides=extra)
        try:
            model = auto.from_config(config, dtype=dtype)
        except ValueError as e:  # transformers has no such head for this architecture
            raise LoramboError(f"model '{model_cfg.name}' ({config.model_type}): {str(e).splitlines()[0]}")
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(model_cfg, trains_base: bool = False) -> torch.dtype:
    """The frozen base weights' dtype (model.base_dtype): auto is bfloat16 on a GPU that has it in hardware (half
    the memory of float32 for the weights that are never trained), else float32. Adapters and heads stay
    float32, and so does a base that trains (full fine-tuning: AdamW on bf16 weights loses small updates)."""
    if trains_base:
        return torch.float32
    setting = model_cfg.get("base_dtype") or "float32"
    if setting == "auto":
        from lorambo.devices import cuda_has_bf16

        return torch.bfloat16 if cuda_has_bf16() else torch.float32
    if setting not in BASE_DTYPES:
        raise LoramboError(f"model.base_dtype={setting} unknown; use one of: auto, {', '.join(BASE_DTYPES)}")
    return BASE_DTYPES[setting]


def four_bit_config(model_cfg):
    """model.quantize=4bit: QLoRA's base, NF4 weights with double quantisation and bf16 compute, through
    bitsandbytes, which needs a CUDA GPU."""
    if model_cfg.quantize != "4bit":
        raise LoramboError(f"model.quantize={model_cfg.quantize} unknown; use 4bit (QLoRA) or null")
    if not torch.cuda.is_available():
        raise LoramboError("model.quantize=4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); this machine "
                           "has none: drop model.quantize")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoramboError("model.quantize=4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    from lorambo.devices import cuda_has_bf16

    # QLoRA's bf16 compute where the GPU has bf16 units, else fp16 (bf16 is emulated, slowly, before Ampere)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if cuda_has_bf16() else torch.float16)


def prepare_base_for_training(model: nn.Module, model_cfg, train_cfg, trains_base: bool = False) -> nn.Module:
    """What a bf16 or 4-bit base needs before its adapter: the head in float32 (it is trained: AdamW on bf16
    weights loses small updates), fed float32 (a pre-hook casts the base's bf16 features), and a quantised base
    through PEFT's prepare_model_for_kbit_training (norms in float32, input gradients for checkpointing)."""
    if model_cfg.get("quantize"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(train_cfg.get("gradient_checkpointing")),
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if base_dtype(model_cfg, trains_base) != torch.float32 or model_cfg.get("quantize"):
        for name in model_cfg.head_modules:
            head = model.get_submodule(name).float()
            head.register_forward_pre_hook(
                lambda _, args: tuple(a.float() if torch.is_floating_point(a) else a for a in args))
    return model


def use_gradient_checkpointing(model: nn.Module) -> None:
    """train.gradient_checkpointing: activations recomputed in the backward instead of kept (Hugging Face's
    own switch; timm's for vision); the non-reentrant form, which frozen inputs and adapters need. On a PEFT
    model, its base."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    else:
        raise LoramboError(f"train.gradient_checkpointing: {type(model).__name__} has no checkpointing switch")


def _build_timm(model_cfg, task_cfg) -> nn.Module:
    import timm

    pretrained = model_cfg.pretrained
    kwargs = dict(model_cfg.get("timm_kwargs") or {})
    if pretrained and pretrained != "hub":  # a local weights file instead of the hub
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained))
    try:
        model = timm.create_model(model_cfg.timm_name, pretrained=bool(pretrained), num_classes=task_cfg.num_labels,
                                  in_chans=model_cfg.in_chans, **kwargs)
    except (OSError, RuntimeError) as e:
        raise LoramboError(f"cannot load timm model '{model_cfg.timm_name}' (pretrained={pretrained}): "
                           f"{str(e).splitlines()[0]}")
    if model_cfg.get("reset_head"):
        # timm's EfficientNet draws a new head uniform in +-1/sqrt(classes) (0.32 for 10: logits of std ~4 before
        # any training); reset_classifier gives PyTorch's Linear init (+-1/sqrt(features)), as timm's fine-tuning
        # guide does
        model.reset_classifier(task_cfg.num_labels)
    return model


def adaptable_layers(model: nn.Module, target_modules: str) -> list[LayerSpec]:
    """Every Linear, GPT-2 Conv1D or Conv2d whose full name matches the model config's regex (auto: those inside
    the transformer blocks, found_target_modules)."""
    from transformers.pytorch_utils import Conv1D

    if target_modules == AUTO:
        target_modules = found_target_modules(model, type(model).__name__)
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


# Mixture-of-experts routers (Mixtral's block_sparse_moe.gate, Qwen-MoE's mlp.gate and shared_expert_gate,
# Switch's router.classifier): Linear layers inside the blocks whose outputs pick experts, not features.
ROUTER = re.compile(r"(^|\.)(router|gate|shared_expert_gate)(\.|$)")


def block_stacks(model: nn.Module) -> list[str]:
    """The transformer's stacks of repeated blocks: the outermost nn.ModuleLists whose items are all of one class
    (BERT's encoder.layer, GPT-2's h, Llama's model.layers, T5's encoder.block and decoder.block)."""
    stacks = []
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
                and not any(name.startswith(s + ".") for s in stacks)):
            stacks.append(name)
    return stacks


def found_target_modules(model: nn.Module, model_name: str) -> str:
    """target_modules=auto: every Linear/Conv1D inside the block stacks, routers excluded (heads, embeddings
    and the LM head lie outside the stacks), as a regex with each block's index generalised (`\\d+`), or the
    exact names where the generalised one would match more."""
    from transformers.pytorch_utils import Conv1D

    stacks = block_stacks(model)
    linear = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    found = {name for name in linear if any(name.startswith(s + ".") for s in stacks) and not ROUTER.search(name)}
    if not found:
        raise LoramboError(
            f"model '{model_name}': no Linear/Conv1D layer inside repeated transformer blocks to adapt (block "
            f"stacks found: {', '.join(stacks) or 'none'}; {len(linear)} Linear/Conv1D layers in all); set "
            f"model.target_modules to a regex of the layers to adapt")
    general = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) for name in found})
    pattern = f"^({'|'.join(general)})$"
    if {name for name in linear if re.search(pattern, name)} != found:
        pattern = f"^({'|'.join(re.escape(name) for name in sorted(found))})$"
    return pattern


def found_head_modules(model: nn.Module, model_cfg) -> list[str]:
    """head_modules=auto: a classifier's modules beside its base model (classifier, score, classification_head;
    DeBERTa's pooler), trained with the adapter as PEFT's modules_to_save; a causal LM's head is pretrained (tied
    to the embeddings in most models) and stays frozen."""
    if model_cfg.family == "causal_lm":
        return []
    base = getattr(model, "base_model_prefix", None)
    heads = [name for name, child in model.named_children()
             if name != base and next(child.parameters(), None) is not None]
    if not heads:
        raise LoramboError(f"model '{model_cfg.name}': no classification head beside its base model "
                           f"'{base}'; set model.head_modules to the head's module names")
    return heads


def resolve_auto_modules(model_cfg, model: nn.Module) -> None:
    """target_modules / head_modules = auto: found from the built model, written into the config (the run's
    config_resolved.yaml then names them). An explicit value wins."""
    if model_cfg.target_modules == AUTO:
        model_cfg.target_modules = found_target_modules(model, model_cfg.name)
    if model_cfg.head_modules == AUTO:
        model_cfg.head_modules = found_head_modules(model, model_cfg)


def head_parameters(model: nn.Module, head_modules) -> list[torch.nn.Parameter]:
    params = []
    for name in head_modules:
        params += list(model.get_submodule(name).parameters())
    return params


def load_data_and_base(cfg, run_dir: str, main: bool, device=None):
    """The task's data and the base model with its layers and head found; a task with its own evaluation sees
    the base first (instruct: forgetting's reference loss, on `device`)."""
    from lorambo.data import load_task
    from lorambo.results import write_json_atomic

    from lorambo.methods import method_class

    tokenizer = build_tokenizer(cfg.model)
    data = load_task(cfg.task, cfg.model, tokenizer, cfg.seed)
    trains_base = not method_class(cfg.method).trains_adapter  # full fine-tuning: float32 weights
    model = build_model(cfg.model, cfg.task, tokenizer, trains_base)
    check_length_fits(cfg.task, model)
    resolve_auto_modules(cfg.model, model)
    model = prepare_base_for_training(model, cfg.model, cfg.train, trains_base)
    if data.label_names:  # a local file's class names: in the model's config (saved with it) and the folder
        name_labels(model, data.label_names)
        if main:
            write_json_atomic(os.path.join(run_dir, "labels.json"), dict(enumerate(data.label_names)))
    if not cfg.model.pretrained and not cfg.model.get("pretrain") and main:
        save_base_model(model, cfg.model, run_dir)  # a config-built base is random: keep it for reloading
    if data.evaluate is not None:
        data.evaluate.observe_base(model.to(device) if device is not None else model)
    return data, model


# position embeddings offset by the padding index (their first pad_token_id + 1 rows are never a text position)
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text")


def check_length_fits(task_cfg, model) -> None:
    """task.max_length within the model's learnt position table: beyond it a long text fails in the forward pass
    (rotary and relative positions, Llama's, T5's, DeBERTa-v3's, have no table and no such end)."""
    tables = [m.num_embeddings for name, m in model.named_modules()
              if isinstance(m, nn.Embedding) and name.endswith(("position_embeddings", "wpe"))]
    if not task_cfg.get("max_length") or not tables:
        return
    positions = min(tables)
    if model.config.model_type in OFFSET_POSITIONS:
        positions -= (model.config.pad_token_id or 0) + 1
    if task_cfg.max_length > positions:
        raise LoramboError(f"task.max_length={task_cfg.max_length} is longer than the model's {positions} positions; "
                           f"set task.max_length={positions} or less")


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
