"""bench/gpu_check.sh cannot run here (no GPU); its case list can be checked: every case composes into a valid
config, and together they cover every preset's rows, every method, every allocator, QLoRA, bf16 and fp16, and
two processes."""

import os
import subprocess
import sys

import pytest

from lorambo.cli import group_options
from lorambo.config import preset_cells
from lorambo.schema import validate
from tests.helpers import ROOT, bench_script

pytestmark = pytest.mark.xdist_group("gpu_check")  # one worker makes the cases (a minute of compositions) once


@pytest.fixture(scope="module")
def gpu_check():
    return bench_script("gpu_check")


@pytest.fixture(scope="module")
def cases(gpu_check):
    return gpu_check.cases()  # each composed as it is made (its config: what its overrides compose into)


@pytest.mark.slow
def test_every_case_composes_into_a_valid_config(cases):
    assert len({c.name for c in cases}) == len(cases)
    for case in cases:
        cfg = case.config
        validate(cfg)
        assert cfg.train.max_steps == 4 and cfg.logger.name == "none", case.name


@pytest.mark.slow
def test_a_cases_config_is_what_its_overrides_compose_into(gpu_check, cases):
    """The small stand-in model and the instruct task's few answers are set on the composed config, not composed
    again: the result must be the composition of the case's own overrides."""
    from omegaconf import OmegaConf

    from lorambo.config import compose_config

    for needle in ("model.pretrained=", "task.max_test_samples="):
        case = next(c for c in cases if any(o.startswith(needle) for o in c.overrides))
        assert OmegaConf.to_yaml(case.config, resolve=True) == OmegaConf.to_yaml(
            compose_config(case.overrides), resolve=True), case.name


@pytest.mark.slow
def test_the_cases_cover_every_preset_row_method_allocator_and_precision(cases):
    from lorambo.allocators import ALLOCATORS, import_allocators
    from lorambo.methods import METHODS, import_builtin

    import_builtin("lorambo.methods")
    import_allocators()
    tags = set().union(*(c.tags for c in cases))
    assert set(group_options("experiment")) <= tags
    assert set(METHODS) <= tags and set(ALLOCATORS) <= tags
    assert {"qlora", "bf16", "fp16", "processes"} <= tags
    for preset in group_options("experiment"):  # every row of every preset
        rows = {tuple(o for o in cell if o.split("=", 1)[0] in ("table_row", "allocator", "method"))
                for cell in preset_cells(preset)}
        assert len([c for c in cases if preset in c.tags]) == len(rows), preset
    qlora = [c.config for c in cases if "qlora" in c.tags]
    assert qlora and all(cfg.model.quantize == "4bit" for cfg in qlora)
    assert all(cfg.model.pretrained == "meta-llama/Llama-3.2-1B" for cfg in qlora)  # the small stand-in
    assert any(c.processes == 2 and c.command("out")[:2] == ["accelerate", "launch"] for c in cases)


@pytest.mark.slow
def test_the_script_lists_its_cases_and_refuses_to_run_without_a_gpu(gpu_check, cases, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--list", "--only", "qlora"])
    gpu_check.main()
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 4 and all("model.quantize=4bit" in line for line in listed)
    ran = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--only", "precision/bf16"],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert ran.returncode != 0 and "no CUDA GPU" in ran.stderr
