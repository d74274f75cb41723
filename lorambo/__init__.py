"""lorambo: an experiment runner for LoRA rank allocation research."""

from lorambo._torchvision_fix import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"

from lorambo import config as _config  # noqa: E402,F401  (registers the OmegaConf resolvers the configs use)
