"""Ways of training, one module each, registered by name (PEFT's `tuners/<method>/`, timm's registry).

A method is a small class whose hooks the training loop calls at named points; it holds everything about
itself (its adapter, its extra parameters and loss, its state in a checkpoint, its counts), so that the loop in
lorambo/train.py has no method flags. `method=NAME` picks one (config group `method`); a method defined outside
lorambo names its module in its yaml (`module: my_package.my_method`), which is imported before lookup.

The loop, in order:
  train_mode(model)                      before training (and after each evaluation during it)
  wrap(model, p_max, ranks, stats)       build the trained model (ranks from the allocator if uses_allocator)
  param_groups(model)                    the optimizer's parameter groups
  per micro-batch: measuring(step, model) as a context around forward/backward; loss_term() added to the loss;
                   after_optimizer_step(model, step) between the optimizer step and zero_grad
  per optimizer step: after_step(step, model, optimizer, accelerator) -> True when parameters were replaced
  state(model) / load_state(model, state)  what a checkpoint holds of the model and the method
  finish(model, step) -> metrics          before the final evaluation: cut, count, the method's own results
  save(model, run_dir)                   the trained weights (a PEFT adapter folder, or the whole model)
"""

import importlib
import pkgutil
from contextlib import nullcontext
from difflib import get_close_matches

import torch
from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict

from lorambo.errors import LoramboError

METHODS: dict[str, type] = {}

# keys a method or allocator yaml may hold beside its options
RESERVED_KEYS = {"name", "module", "report_order"}


def register(name: str):
    """Class decorator: make a method available as `method=NAME`."""
    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def import_builtin(package: str) -> None:
    """Import every module of a package, so that each registers itself (no hand-kept list)."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        importlib.import_module(f"{package}.{info.name}")


def import_named_module(group_cfg, group: str) -> None:
    """A yaml's `module:` (a method or allocator defined outside lorambo): imported so that it registers."""
    if group_cfg.get("module"):
        try:
            importlib.import_module(group_cfg.module)
        except ImportError as e:
            raise LoramboError(f"{group}.module='{group_cfg.module}' cannot be imported ({e}); put it on "
                               f"PYTHONPATH or fix the name")


def check_options(given, known, what: str, elsewhere: dict | None = None) -> None:
    """An option the code does not read is a typo or a misplaced key: say so (with the near miss, here or in
    `elsewhere`: {"method.": its keys}) rather than ignore it."""
    unknown = sorted(set(given) - set(known) - RESERVED_KEYS)
    if unknown:
        candidates = {k: k for k in known} | {prefix + k: k for prefix, keys in (elsewhere or {}).items()
                                               for k in keys if k not in RESERVED_KEYS}
        near = get_close_matches(unknown[0], list(candidates.values()), n=1)
        near = [full for full, short in candidates.items() if near and short == near[0]][:1]
        raise LoramboError(f"{what} has no option '{unknown[0]}'" + (f" (did you mean '{near[0]}'?)" if near else "")
                           + f"; its options are: {', '.join(sorted(known)) or '(none)'}")


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def method_class(method_cfg) -> type:
    """The registered class of `method=NAME` (its module imported first when defined outside lorambo)."""
    import_builtin("lorambo.methods")
    import_named_module(method_cfg, "method")
    if method_cfg.name not in METHODS:
        raise LoramboError(f"unknown method '{method_cfg.name}'; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[method_cfg.name]


def checked_method_class(method_cfg) -> type:
    """The method's class, once its options are known to it and of their types (before anything is built)."""
    cls = method_class(method_cfg)
    check_options(method_cfg, cls.Options.model_fields, f"method {method_cfg.name}")
    from lorambo.schema import validate_options

    options = OmegaConf.to_container(method_cfg, resolve=True)
    validate_options(cls.Options, {k: v for k, v in options.items() if k not in RESERVED_KEYS}, "method.")
    return cls


def build_method(cfg, layers, steps: int, run_dir: str, is_main: bool):
    return checked_method_class(cfg.method)(cfg, layers, steps, run_dir, is_main)


class Method:
    """The hooks with what plain training does at each (nothing); every method overrides what it changes."""

    name = ""
    Options: type[BaseModel] = NoOptions  # its yaml's keys beside name and module, with their types and ranges
    uses_allocator = False  # its ranks come from the allocator (config group `allocator`) under the budget
    trains_adapter = True  # False: no adapter and no budget (full fine-tuning)
    has_scale_policy = False  # True: its update scale follows lora.scaling (a tuned sweep searches it too)

    def __init__(self, cfg, layers, steps: int, run_dir: str, is_main: bool):
        self.cfg, self.layers, self.steps, self.run_dir, self.is_main = cfg, layers, steps, run_dir, is_main
        self.opts = cfg.method

    def label(self) -> str:
        """The row name in metrics.json's `allocator` and in tables."""
        return self.name

    def train_mode(self, model) -> None:
        """Training mode; with an adapter, batch-norm layers keep their base statistics (eval mode): running
        stats are buffers of the base model that the adapter file does not hold, so updating them would make the
        saved adapter not reproduce the trained model (and only adapter parameters are meant to change)."""
        model.train()
        if self.trains_adapter:
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def required_stats(self) -> set[str]:
        """Statistics of the base model the method needs (estimated with the allocator's, before wrapping)."""
        return set()

    def fixed_cost(self) -> int:
        """Parameters the method pays before any rank (DoRA's magnitudes): the allocator gets P_max minus this."""
        return 0

    def wrap(self, model, p_max, ranks, stats):
        raise NotImplementedError

    def adapter_config(self, p_max, ranks):
        """The PEFT config of an adapter at `ranks` (lorambo-allocate writes it), or None for a method whose
        ranks are not fixed before training."""
        return None

    def param_groups(self, model) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def measuring(self, step: int, model):
        return nullcontext()

    def loss_term(self):
        return None

    def after_optimizer_step(self, model, step: int) -> None:
        pass

    def after_step(self, step: int, model, optimizer, accelerator) -> bool:
        return False

    def state(self, model) -> dict:
        raise NotImplementedError

    def load_state(self, model, state: dict) -> None:
        raise NotImplementedError

    def finish(self, model, step: int) -> dict:
        raise NotImplementedError

    def save(self, model, run_dir: str) -> None:
        raise NotImplementedError
