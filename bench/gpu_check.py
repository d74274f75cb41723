"""The first thing a maintainer with a CUDA GPU and the hub runs: every preset's rows, every method and
allocator, QLoRA, bf16 and fp16, and two processes, each a few steps on the real hub models (small ones where
a preset's own is large), one line per case with its peak GPU memory and median step time.

    bash bench/gpu_check.sh                 # everything (about an hour on one A100, most of it downloads)
    bash bench/gpu_check.sh --list          # the cases, without running them
    bash bench/gpu_check.sh --only qlora    # the cases whose name contains a word

Each case is `lorambo-run OVERRIDES` into its own folder under runs/gpu_check/ (the error line of a failed one
is printed beside it). What this checks that no CPU test can: CUDA kernels, bitsandbytes, bf16/fp16 autocast
and loss scaling, NCCL with two processes, memory; tests/test_device_discipline.py checks device placement on
a CPU machine. The case list is tested there (tests/test_gpu_check.py): every case composes.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a few steps of everything, evaluated on a few examples
FEW_STEPS = ["train.max_steps=4", "train.log_every=2", "train.eval_every=0", "task.max_train_samples=64",
             "task.max_eval_samples=32", "logger=none", "hydra.mode=RUN"]
INSTRUCT = ["task.max_test_samples=4", "task.max_new_tokens=16"]  # generation: a few short answers
# a preset's model too large for a quick check, and the small one of the same family that stands in for it
SMALLER = {"meta-llama/Llama-3.2-3B": "meta-llama/Llama-3.2-1B", "mistralai/Mistral-7B-v0.3": "Qwen/Qwen2.5-0.5B"}
ROW_AXES = ("table_row", "allocator", "method")  # what distinguishes a preset's rows


@dataclass
class Case:
    name: str
    overrides: list[str]
    config: object  # what the overrides compose into (the case list's test validates it)
    processes: int = 1
    tags: set = field(default_factory=set)

    def command(self, out_dir: str) -> list[str]:
        args = [*self.overrides, f"hydra.run.dir={os.path.join(out_dir, self.name)}"]
        if self.processes > 1:
            return ["accelerate", "launch", "--num_processes", str(self.processes), "-m", "lorambo.cli", *args]
        return [os.path.join(os.path.dirname(sys.executable), "lorambo-run"), *args]


def preset_rows(preset: str) -> list[list[str]]:
    """One cell per row of a preset: its first task, model, budget and seed, every row."""
    from lorambo.config import preset_cells

    rows = {}
    for cell in preset_cells(preset):
        row = tuple(o for o in cell if o.split("=", 1)[0] in ROW_AXES)
        rows.setdefault(row, cell)
    return [[o for o in cell if not o.startswith("seed=")] for cell in rows.values()]


def quick(overrides: list[str]):
    """(the cell's overrides cut to a few steps, on a smaller model where the preset's is large; their config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from lorambo.config import compose_config

    overrides = [*overrides, *FEW_STEPS]
    cfg = compose_config(overrides)
    extra = INSTRUCT if cfg.task.type == "instruct" else []
    if cfg.model.get("pretrained") in SMALLER:
        extra = [*extra, f"model.pretrained={SMALLER[cfg.model.pretrained]}"]
    # the extras set plain values: applied to the composed config as Hydra would (a composition costs 0.2-0.5 s)
    for override in OverridesParser.create().parse_overrides(extra):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    return [*overrides, *extra], cfg


@functools.cache
def cases() -> list[Case]:
    from lorambo.allocators import ALLOCATORS, import_allocators
    from lorambo.cli import group_options
    from lorambo.methods import METHODS, import_builtin

    found = []
    for preset in group_options("experiment"):
        for cell in preset_rows(preset):
            row = "_".join(o.split("=", 1)[1] for o in cell if o.split("=", 1)[0] in ROW_AXES) or "default"
            found.append(Case(f"{preset}/{row}", *quick(cell), tags={"preset", preset}))
    import_builtin("lorambo.methods")
    for method in sorted(METHODS):  # every method on a real encoder and a real causal LM
        for model, task in (("roberta", "sst2"), ("llama", "metamathqa")):
            found.append(Case(f"method/{method}/{model}", *quick([f"model={model}", f"task={task}",
                                                                  f"method={method}", "budget=r4"]),
                              tags={"method", method}))
    import_allocators()
    for allocator in sorted(ALLOCATORS):
        found.append(Case(f"allocator/{allocator}/llama", *quick(["model=llama", "task=metamathqa",
                                                                 f"allocator={allocator}", "budget=r4"]),
                          tags={"allocator", allocator}))
    for allocator in ("uniform", "frobenius_greedy", "data_weighted", "eva"):  # what a 4-bit base can take
        found.append(Case(f"qlora/{allocator}", *quick(["experiment=llm_method_comparison", "hydra.mode=RUN",
                                                       f"table_row={allocator}", "model.quantize=4bit"]),
                          tags={"qlora"}))
    for precision in ("bf16", "fp16", "auto"):
        found.append(Case(f"precision/{precision}", *quick(["model=roberta", "task=sst2", "allocator=hessian_offline",
                                                           f"train.mixed_precision={precision}"]),
                          tags={"precision", precision}))
    found.append(Case("processes/2/hessian_online", *quick(["model=roberta", "task=sst2", "allocator=hessian_online",
                                                           "method.grow_every=1", "method.growth_events=2"]),
                      processes=2, tags={"processes"}))
    found.append(Case("processes/2/adalora", *quick(["model=roberta", "task=sst2", "method=adalora",
                                                    "method.delta_t=1"]), processes=2, tags={"processes"}))
    return found


def run_case(case: Case, out_dir: str) -> str:
    start = time.perf_counter()
    result = subprocess.run(case.command(out_dir), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    metrics_file = os.path.join(out_dir, case.name, "metrics.json")
    if result.returncode != 0 or not os.path.exists(metrics_file):
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        return f"FAIL  {case.name:<48} {seconds:6.0f} s  {errors[-1][:160] if errors else 'no output'}"
    with open(metrics_file) as f:
        m = json.load(f)
    return (f"ok    {case.name:<48} {m['peak_memory_bytes'] / 2**30:6.2f} GiB  {m['step_seconds_median']:7.3f} s/step"
            f"  {m['mixed_precision']} base {m.get('base_dtype')}  {seconds:5.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the cases and their commands, run nothing")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--out", default=os.path.join("runs", "gpu_check"))
    args = parser.parse_args()
    if not args.list:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_check: error: no CUDA GPU here; this check is for a machine with one (--list shows "
                     "the cases)")
    selected = [c for c in cases() if args.only in c.name]
    if args.list:
        for case in selected:
            print(f"{case.name:<48} {' '.join(case.command(args.out))}")
        return
    failed = 0
    for case in selected:
        line = run_case(case, args.out)
        failed += line.startswith("FAIL")
        print(line, flush=True)
    print(f"{len(selected) - failed} of {len(selected)} cases ran")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
