import os

import pytest
import torch

import lorambo  # noqa: F401  (its torchvision fix: xdist's controller imports the modules of workers' warnings)

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _parse_each_config_file_once():
    """Hydra parses every yaml file of a config again at each composition (a few hundred compositions in the
    presets' and gpu_check's tests, thousands in all): here each file is parsed once per process (keyed by its path
    and modification time) and each composition gets its own copy, which made a composition 40% faster."""
    import copy

    from hydra._internal.core_plugins import file_config_source as source

    parse, parsed = source.FileConfigSource.load_config, {}

    def load_config(self, config_path):
        key = (self.path, config_path)
        full = os.path.join(self.path.removeprefix("file://"), self._normalize_file_name(config_path))
        stamp = os.stat(full).st_mtime_ns if os.path.exists(full) else None
        if parsed.get(key, (None,))[0] != stamp or stamp is None:
            parsed[key] = (stamp, parse(self, config_path))
        result = parsed[key][1]
        return source.ConfigResult(config=copy.deepcopy(result.config), path=result.path, provider=result.provider,
                                   header=dict(result.header))

    source.FileConfigSource.load_config = load_config


_parse_each_config_file_once()


def pytest_configure(config):
    """Under pytest-xdist (`make test`: -n 2), each worker gets its own share of the cores: its affinity, which
    lorambo's thread count and every subprocess follow (torch starts a thread per core in every process; two
    full-width processes on 2 cores slowed each other many times over)."""
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if workers <= len(cores):
            mine = set(cores[int(worker.removeprefix("gw")) % workers::workers])
            os.sched_setaffinity(0, mine)
            torch.set_num_threads(len(mine))


@pytest.fixture
def float64():
    """Numerical references run in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def pair_csv(tmp_path_factory):
    """A small local file of text pairs with labels (label 1 when the pair shares its first word): the
    local_file task of tiny_roberta (tests/helpers.FAMILIES)."""
    import csv
    import random

    rng = random.Random(0)
    words = ["good", "bad", "long", "short", "red", "blue", "fast", "slow"]
    path = tmp_path_factory.mktemp("data") / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["premise", "hypothesis", "label"])
        for _ in range(200):
            a, b = rng.choice(words), rng.choice(words)
            writer.writerow([f"{a} film here", f"{b} story there", int(a == b)])
    return str(path)
