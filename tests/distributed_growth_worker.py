"""Run by tests/test_growth.py in two forked CPU processes on gloo (or under torchrun): one growth event measured on
different data in each process; each process saves the ranks and A factors it ends with."""

import sys

import torch
from omegaconf import OmegaConf
from torch import nn

import lorambo  # noqa: F401
from lorambo.adapters import factor_matrices, lora_layers
from lorambo.budget import LayerSpec
from lorambo.methods.growth import OnlineGrowth
from tests.helpers import LORA, Tiny


def main(out_dir):
    from accelerate import Accelerator

    from lorambo.adapters import wrap_lora

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # same model everywhere
    model = wrap_lora(Tiny(), {"conv": 1, "fc1": 1, "fc2": 1}, [], LORA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(100 + accelerator.process_index)  # different data in each process
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    specs = [LayerSpec("conv", 4, 18, "conv2d"), LayerSpec("fc1", 16, 64), LayerSpec("fc2", 3, 16)]
    options = OmegaConf.create({"growth_events": 1, "grow_every": 1})
    growth = OnlineGrowth(specs, p_max=400, traces={s.name: 1.0 for s in specs}, options=options,
                          run_dir=out_dir, total_steps=1)
    with growth.measuring(model):
        nn.functional.cross_entropy(model(x), y).backward()
    increments = growth.grow(1, model, optimizer, accelerator)
    gathered = accelerator.gather(x.reshape(1, -1))
    torch.save({"ranks": {n: int(m.r["default"]) for n, m in lora_layers(model).items()},
                "A": {n: factor_matrices(m)[0].detach().clone() for n, m in lora_layers(model).items()},
                "increments": increments,
                "data_differs": not torch.equal(gathered[0], gathered[1])},
               f"{out_dir}/rank{accelerator.process_index}.pt")
    # leave together and close the process group, as lorambo's training does: a process that exits while gloo's
    # threads still serve the other one can abort ("terminate called without an active exception")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
