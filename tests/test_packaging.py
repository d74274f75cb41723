"""A wheel user's install: built from the tree, installed into a new virtual environment, run outside the tree.

Regression: package-data listed only conf/hydra/launcher, so a wheel had no conf/hydra/sweeper/tuned.yaml and
every tuned preset failed for anyone who ran `pip install .` (the editable install of the tests hid it)."""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A venv holding only lorambo's wheel; its dependencies come from this environment's site-packages (a
    plain path entry: their .pth hooks, the editable lorambo's among them, are not run), so lorambo is the
    wheel's."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # the tracked files only, as a fresh clone has them (no egg-info from an install)
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file() and not (ROOT / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(source)], check=True, capture_output=True, text=True)
    wheel = next((tmp / "dist").glob("lorambo-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    python = tmp / "venv" / "bin" / "python"
    target = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target,
                    str(wheel)], check=True, capture_output=True, text=True)
    with open(Path(target) / "lorambo_test_dependencies.pth", "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    # console scripts: pip --target does not write them; the venv's python runs the same entry points
    work = tmp / "work"
    work.mkdir()
    return {"wheel": wheel, "python": python, "work": work, "target": target}


def run(env, module_call: str, args, timeout=600):
    code = f"import sys; from {module_call.rsplit('.', 1)[0]} import {module_call.rsplit('.', 1)[1]} as main; " \
           f"sys.argv = ['lorambo-run', *sys.argv[1:]]; main()"
    environment = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([env["python"], "-c", code, *args], cwd=env["work"], capture_output=True, text=True,
                          timeout=timeout, env=environment)


@pytest.mark.slow
def test_the_wheel_ships_every_config(wheel_env):
    names = set(zipfile.ZipFile(wheel_env["wheel"]).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "lorambo" / "conf").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)[:5]
    assert "hydra_plugins/lorambo_tuned_sweeper/tuned_sweeper.py" in names


@pytest.mark.slow
def test_a_wheel_install_runs_a_tuned_sweep_outside_the_tree(wheel_env):
    """The installed wheel's configs, its Hydra plug-in (the tuned sweeper) and its runs: a search of two points
    and the chosen point's run, each a whole run folder."""
    where = subprocess.run([wheel_env["python"], "-c", "import lorambo; print(lorambo.__file__)"],
                           cwd=wheel_env["work"], capture_output=True, text=True, check=True).stdout
    assert where.startswith(wheel_env["target"]), where  # the wheel's lorambo, not the source tree's
    sweep = run(wheel_env, "lorambo.cli.main", [
        "experiment=tuned", "model=tiny_bert", "table_row=uniform", "seed=0", "task.max_train_samples=64",
        "task.max_eval_samples=32", "train.max_steps=2", "train.batch_size=8", "hydra.sweeper.lr_factors=[0.5,2]",
        "hydra.sweeper.scalings=[matched]", "hydra.sweep.dir=tuned"])
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    record = json.loads((wheel_env["work"] / "tuned" / "tuning.json").read_text())
    assert len(record["cells"]) == 1 and len(list((wheel_env["work"] / "tuned" / "search").iterdir())) == 2
    finals = list((wheel_env["work"] / "tuned").glob("*/metrics.json"))
    assert len(finals) == 1 and json.loads(finals[0].read_text())["steps"] == 2
