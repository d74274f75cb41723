"""The composed config, checked once before anything is built.

pydantic (already installed with wandb) rather than Hydra's structured configs: typed fields with readable
errors and `extra="forbid"` for misspelt keys, over the yaml groups as they are, without rewriting each group
as a dataclass. A method's own options are its class's `Options` model (lorambo/methods/)."""

import re
from difflib import get_close_matches
from typing import Literal

from omegaconf import OmegaConf
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from lorambo.errors import LoramboError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Train(Section):
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    eval_batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    max_steps: int | None = Field(ge=1)  # null: train.epochs
    grad_accum: int = Field(ge=1)
    warmup_ratio: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    max_grad_norm: float | None = Field(ge=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"]
    # defaults: what a run configured before these keys existed did
    threads: int | None = Field(default=None, ge=1)
    num_workers: int | None = Field(default=None, ge=0)  # null: data.default_workers()
    dropout_masks: Literal["packed", "torch"] = "torch"
    compile: bool = False
    compile_backend: str = "inductor"
    gradient_checkpointing: bool = False
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"  # after warm-up (transformers')

    @model_validator(mode="after")
    def known_backend(self):
        if self.compile:
            import torch._dynamo

            if self.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
                raise ValueError(f"train.compile_backend={self.compile_backend} is not a torch.compile backend; "
                                 f"choose one of: {', '.join(sorted(torch._dynamo.list_backends()))}")
        return self
    log_every: int = Field(ge=1)
    eval_every: int = Field(ge=0)
    checkpoint_every: int = Field(ge=0)
    keep_checkpoint: bool


class Lora(Section):
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    scaling: Literal["matched", "per_layer", "rslora"]


class Sensitivity(Section):
    gradient_batches: int = Field(ge=1)
    hessian_batches: int = Field(ge=1)
    hutchinson_probes: int = Field(ge=1)
    power_iterations: int = Field(ge=1)
    covariance_batches: int = Field(ge=1)
    fisher_batches: int = Field(ge=1)
    fisher_samples: int = Field(ge=1)
    fisher_labels: Literal["model", "true"]
    eva_rho: float = Field(default=2.0, ge=1)
    eva_tau: float = Field(default=0.95, ge=0, le=1)
    eva_max_batches: int = Field(default=200, ge=1)
    head_warmup_steps: int = Field(ge=0)
    head_warmup_lr: float = Field(gt=0)
    curvature: Literal["fisher_trace", "hessian_trace"]


class Budget(Section):
    kind: Literal["absolute", "match_uniform"]
    p_max: int | None = Field(default=None, ge=1)
    rank: int | None = Field(default=None, ge=1)
    scale: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def has_its_size(self):
        if self.kind == "absolute" and self.p_max is None:
            raise ValueError("an absolute budget needs budget.p_max")
        if self.kind == "match_uniform" and self.rank is None:
            raise ValueError("a budget matched to uniform needs budget.rank")
        return self


class Task(BaseModel):
    model_config = ConfigDict(extra="allow")  # each source has its own keys (paths, fields, splits)
    type: Literal["classification", "regression", "lm", "image_classification", "instruct"]
    name: StrictStr
    source: StrictStr | None = None
    path: StrictStr | None = None
    validation_path: StrictStr | None = None
    text_fields: list[StrictStr] | None = None
    label_field: StrictStr | None = None
    label_names: list[StrictStr] | None = None  # local files: the labels' names in order (lorambo/local_file.py)
    train_split: StrictStr | None = None
    validation_fraction: float | None = Field(default=None, gt=0, lt=1)
    num_labels: int | None = Field(default=None, ge=1)
    max_train_samples: int | None = Field(default=None, ge=1)  # null: no limit
    max_eval_samples: int | None = Field(default=None, ge=1)
    max_length: StrictInt | None = Field(default=None, ge=1)  # strict: a float (1e9) reached the tokenizer
    metrics: list[StrictStr] = []
    main_metric: StrictStr | None = None
    dev_fraction: float | None = Field(default=None, gt=0, lt=1)  # set: evaluate on a dev split carved from train
    document_end: Literal["eos"] | None = "eos"  # lm: the end token after each text row, or none (WikiText lines)

    @model_validator(mode="after")
    def classes(self):
        if self.type == "classification" and (self.num_labels or 0) < 2:
            raise ValueError("a classification task needs task.num_labels >= 2 (for one output: "
                             "task.type=regression)")
        if self.text_fields == []:
            raise ValueError("task.text_fields=[] names no text; give the field(s) that hold it, e.g. "
                             "task.text_fields=[text]")
        known = TASK_METRICS[self.type]
        for name in self.metrics:
            if name not in known:
                raise ValueError(f"task.metrics: unknown metric '{name}' for a {self.type} task; choose from: "
                                 f"{', '.join(known)}")
        splits = list(self.model_extra.get("eval_splits") or {})
        base = next((self.main_metric[: -len(s) - 1] for s in splits if (self.main_metric or "").endswith("_" + s)),
                    self.main_metric)
        if self.main_metric is not None and self.metrics and base not in self.metrics:
            raise ValueError(f"task.main_metric={self.main_metric} is not one of the task's metrics "
                             f"({', '.join(self.metrics)}); choose one of them")
        return self


class Model(Section):
    """The keys the model configs use (lorambo/conf/model/); a misspelt `+model.KEY` is refused here."""
    name: StrictStr
    family: Literal["auto", "encoder", "causal_lm", "t5", "vision"]
    pretrained: StrictStr | None = None
    tokenizer: StrictStr | None = None
    target_modules: StrictStr  # a regex over module names, or auto (found from the model)
    head_modules: StrictStr | list[StrictStr] = []
    per_head_modules: StrictStr | None = None
    lr: float = Field(gt=0)
    full_ft_lr: float | None = Field(default=None, gt=0)
    base_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    quantize: Literal["4bit"] | None = None
    trust_remote_code: StrictBool = False
    reset_head: StrictBool = False
    hf_config: dict | None = None  # a transformers config's own keys (a model built from scratch)
    pretrain: dict | None = None  # a base pretrained here (lorambo/pretrain.py)
    timm_name: StrictStr | None = None
    timm_kwargs: dict | None = None
    in_chans: int | None = Field(default=None, ge=1)
    image_size: int | None = Field(default=None, ge=1)
    mean: list[float] | None = None
    std: list[float] | None = None

    @field_validator("target_modules", "per_head_modules")
    @classmethod
    def a_regex(cls, value):
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a regular expression ({e}); quote it whole, e.g. "
                                 f"'model.target_modules=\"(q|v)_proj$\"'") from None
        return value


class Logger(Section):
    name: Literal["wandb", "none"]
    mode: Literal["offline", "online", "disabled"] | None = None
    project: StrictStr | None = None


class Choice(BaseModel):
    """A method, allocator or optimizer: its reserved keys here, its own options by its class (lorambo/methods,
    lorambo/allocation.py) or its constructor (lorambo/optimizers)."""
    model_config = ConfigDict(extra="allow")
    name: StrictStr
    module: StrictStr | None = None  # a plug-in's module, imported before its name is looked up
    report_order: int | None = None
    from_run: StrictStr | None = None  # allocator: the ranks of an earlier run


# the metrics each task type computes (lorambo/metrics.py, evaluation.py, instruct.py)
TASK_METRICS = {
    "classification": ("accuracy", "f1", "mcc"),
    "image_classification": ("accuracy", "f1", "mcc"),
    "regression": ("pearson", "spearman", "pearson_spearman"),
    "lm": ("perplexity",),
    "instruct": ("accuracy", "validation_loss", "forgetting"),
}


class Run(Section):
    seed: int = Field(ge=0, lt=2**32)  # numpy's seeds are 32-bit (accelerate's set_seed seeds it)
    resume: str | None = None
    skip_finished: bool = False
    model: Model
    logger: Logger
    optimizer: Choice
    method: Choice
    allocator: Choice
    lora: Lora
    sensitivity: Sensitivity
    train: Train
    budget: Budget
    task: Task


def one_line(error: ValidationError, data: dict, prefix: str = "") -> str:
    """pydantic's first error as one line naming the key, its value and the fix (a near miss for a new key)."""
    first = error.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    key = prefix + path
    if first["type"] == "extra_forbidden":
        section = data
        for part in first["loc"][:-1]:
            section = section.get(part, {}) if isinstance(section, dict) else {}
        known = [k for k in section if k != first["loc"][-1]] if isinstance(section, dict) else []
        near = get_close_matches(str(first["loc"][-1]), known, n=1)
        hint = f"did you mean {prefix}{'.'.join(str(p) for p in first['loc'][:-1])}.{near[0]}?" if near else \
            f"known keys: {', '.join(sorted(known))}"
        return f"unknown key {key}; {hint}"
    message = first["msg"].removeprefix("Value error, ")
    if not first["loc"] or isinstance(first.get("input"), dict):  # a rule over several keys: its own words
        return message
    return f"{key}={first.get('input')!r}: {message[:1].lower() + message[1:]}"


def validate(cfg) -> None:
    """Raise LoramboError with one line for the first value out of range, of the wrong type, or misspelt."""
    data = OmegaConf.to_container(cfg, resolve=True)
    try:
        Run.model_validate(data)
    except ValidationError as e:
        raise LoramboError(one_line(e, data)) from None


def validate_options(model: type[BaseModel], options: dict, prefix: str) -> None:
    """A method's or allocator's options against its Options model."""
    try:
        model.model_validate(options)
    except ValidationError as e:
        raise LoramboError(one_line(e, {**options}, prefix)) from None


def check_config(cfg) -> None:
    """Every value and key, once, before anything is built: the sections', then the method's, the allocator's and
    the optimizer's own options (their classes' and functions' own models: imported here, as they import this)."""
    from lorambo.allocation import allocator_options
    from lorambo.methods import checked_method_class
    from lorambo.optimizers import optimizer_options

    validate(cfg)
    if checked_method_class(cfg.method).uses_allocator:
        allocator_options(cfg.allocator, cfg.method)
    optimizer_options(cfg.optimizer)
