"""Dropout whose masks cost less on a CPU: the same Bernoulli masks, drawn four to a random word.

torch's CPU dropout draws one random number per element (`bernoulli_`, about 9 ns each here: 30-40% of a MiniLM
LoRA step with PEFT's dropout on every adapted layer's input). torch's own generator gives 63 random bits per
`random_()` on int64; cut into four 15-bit lanes they are four independent uniforms on {0, ..., 32767}, so one
draw gives four mask elements (about 1.3 ns per element). Written here because neither torch nor PEFT offers a
cheaper mask. The keep probability is 1 - p rounded to a multiple of 1/32768 (p = 0.05 drops 0.049988), and the
kept values are scaled by 1 / (1 - that p), so the layer is unbiased as nn.Dropout is. The masks come from
torch's default generator, so `set_seed` and the checkpoints' RNG state reproduce them."""

import math

import torch
from torch import nn

LANES = 1 << 15  # each 15-bit lane is uniform on {0, ..., LANES - 1}


def keep_mask(shape, p: float, device, dtype) -> torch.Tensor:
    """A mask of `shape` whose entries are 1 / (1 - p') with probability 1 - p' and 0 otherwise, where p' is p
    rounded to a multiple of 1 / 2**15 (`drop_rate`)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    lanes = words.view(torch.int16)[:n].view(shape) & (LANES - 1)  # the sign lane bit is dropped: 15 bits each
    threshold = round(p * LANES)
    return (lanes >= threshold).to(dtype).mul_(1.0 / (1.0 - threshold / LANES))  # in place: one pass fewer


def drop_rate(p: float) -> float:
    """The rate a MaskDropout of probability p really drops at."""
    return round(p * LANES) / LANES


class MaskDropout(nn.Dropout):
    """nn.Dropout with `keep_mask`'s cheaper masks (same `p`, same train/eval behaviour; a subclass, so code
    that reads `module.p`, as transformers' attention does for its own kernel, still sees it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.inplace:
            return x.mul_(keep_mask(x.shape, self.p, x.device, x.dtype))
        return x * keep_mask(x.shape, self.p, x.device, x.dtype)


def use_mask_dropout(model: nn.Module) -> int:
    """Every nn.Dropout in `model` (the base model's and each LoRA layer's) becomes a MaskDropout of the same p,
    in place; returns how many were replaced. Subclasses of nn.Dropout with their own forward are left alone."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(parent, name, MaskDropout(child.p, child.inplace))
                replaced += 1
    return replaced
