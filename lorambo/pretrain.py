"""Bases pretrained here. No GPT-2 or ResNet weights can be downloaded on the CPU machines, so a model config
with a `pretrain:` block is first trained from scratch (a full fine-tuning run of lorambo itself, in a
subprocess so that its seed, devices and peak memory stay its own), once, and cached by what defines it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

from omegaconf import OmegaConf

from lorambo.base_cache import build_once, cache_root, weights_sha256
from lorambo.errors import LoramboError
from lorambo.prepared import prepared_sha256

# a pretraining subprocess is one plain process, even when the run that needs it is one of several
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


# what makes a pretrained base: its shape (overridable on the command line) and how it is pretrained
SHAPE = ("hf_config", "timm_name", "timm_kwargs", "in_chans")
DEFINING = ("family", *SHAPE, "pretrain")


def base_path(model_cfg) -> str:
    """The cache folder of this base: named by the model and a hash of everything that makes it."""
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    defining = {k: spec.get(k) for k in DEFINING}
    digest = hashlib.sha1(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cache_root(), f"{model_cfg.name}-{digest}")


def weights_path(base: str, family: str) -> str:
    """What build_model loads: a Hugging Face model folder, or a timm state-dict file."""
    return os.path.join(base, "model", "model.pt") if family == "vision" else os.path.join(base, "model")


def ensure_pretrained(model_cfg) -> str:
    """The pretrained base's weights, pretraining it first if it is not cached (one process at a time)."""
    base = base_path(model_cfg)
    build_once(base, "metrics.json", lambda: pretrain(model_cfg, base))
    return weights_path(base, model_cfg.family)


def base_sha256(model_cfg) -> str | None:
    """The sha256 of a base pretrained here or prepared from a package (lorambo/prepared.py), recorded in every run
    on it: two runs with the same config and seed give the same numbers only on the same base. None for others."""
    if not model_cfg.get("pretrain"):
        return prepared_sha256(model_cfg.get("pretrained"))
    return weights_sha256(weights_path(base_path(model_cfg), model_cfg.family))  # ensure_pretrained made it


def hydra_value(value) -> str:
    """A plain value (str, number, bool, None, list, dict) in Hydra's override grammar."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def pretrain(model_cfg, base: str) -> None:
    tmp = base + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    # the model exactly as this run has it (its shape may be overridden), trained from scratch
    shape = [f"++model.{k}={hydra_value(spec[k])}" for k in SHAPE if spec.get(k) is not None]
    args = [f"model={model_cfg.name}", *shape, "method=full_ft", "logger=none", "++model.pretrain=null",
            *model_cfg.pretrain.overrides, f"hydra.run.dir={tmp}"]
    print(f"lorambo: pretraining the base {model_cfg.name} once (cached in {base}): lorambo-run {' '.join(args)}",
          file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("ACCELERATE_")}
    result = subprocess.run([sys.executable, "-m", "lorambo.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0 or not os.path.exists(os.path.join(tmp, "metrics.json")):
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        raise LoramboError(f"pretraining the base {model_cfg.name} failed ({(errors or ['see ' + tmp])[-1]}); "
                           f"its run folder is {tmp}")
    os.replace(tmp, base)  # whole or not at all: a half-pretrained base is never used
