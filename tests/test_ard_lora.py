"""ARD-LoRA: regulariser gradients, the effect of total variation, and true parameter counts end to end."""

import math

import pytest
import torch
from safetensors.torch import load_file

from lorambo.methods.ard_lora import depth_chains, head_groups, l1_penalty, soft_mask, true_parameter_count, tv_penalty
from lorambo.budget import LayerSpec
from lorambo.models import adaptable_layers, build_model, build_tokenizer
from tests.helpers import FAMILIES, QUICK, compose_cfg, evaluate_independently, load_base, run_in_process


@pytest.mark.usefixtures("float64")
def test_regularisers_and_soft_mask_have_the_right_gradients():
    torch.manual_seed(0)
    alphas = [torch.rand(3) + 0.5 for _ in range(4)]  # positive and far apart: away from |.|'s kinks
    flat = torch.cat(alphas).requires_grad_(True)
    split = lambda x: list(x.split(3))
    assert torch.autograd.gradcheck(lambda x: l1_penalty(split(x)), (flat,))
    assert torch.autograd.gradcheck(lambda x: tv_penalty([split(x)]), (flat,))
    assert torch.autograd.gradcheck(lambda x: soft_mask(x, 4.0, 8, 0.5), (flat[:3].detach().clone().requires_grad_(),))
    # analytic: d/d alpha_l of sum |alpha_{l+1} - alpha_l| is the sum of the signs of its two differences
    (grad,) = torch.autograd.grad(tv_penalty([split(flat)]), flat)
    a = torch.stack(alphas)
    expected = torch.zeros_like(a)
    expected[:-1] -= torch.sign(a[1:] - a[:-1])
    expected[1:] += torch.sign(a[1:] - a[:-1])
    assert torch.allclose(grad, expected.reshape(-1))


def test_soft_mask_keeps_exactly_the_rounded_rank():
    alpha = torch.tensor([0.3, 1.0, 1.4, 2.0])
    kept = (soft_mask(alpha, 4.0, 8, 0.5) > 0.5).sum(1)
    assert kept.tolist() == torch.round(4.0 * alpha).long().tolist()


@pytest.mark.slow
def test_total_variation_makes_neighbouring_ranks_closer():
    """Scales pulled to alternating targets along depth: with the TV term the ranks of neighbours differ less."""
    targets = torch.tensor([0.5, 2.0] * 4)

    def ranks_after(lambda_tv):
        log_alpha = torch.zeros(8, requires_grad=True)
        opt = torch.optim.Adam([log_alpha], lr=0.05)
        for _ in range(400):
            alpha = log_alpha.exp()
            loss = ((alpha - targets) ** 2).sum() + lambda_tv * tv_penalty([list(alpha.split(1))])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.round(4 * log_alpha.exp()).detach()

    jumps = lambda r: (r[1:] - r[:-1]).abs().sum().item()
    assert jumps(ranks_after(1.0)) < jumps(ranks_after(0.0))


def test_depth_chains_group_the_same_kind_of_layer_in_order():
    names = ["enc.layer.10.q", "enc.layer.2.q", "enc.layer.2.k", "head"]
    assert sorted(depth_chains(names)) == [["enc.layer.2.k"], ["enc.layer.2.q", "enc.layer.10.q"], ["head"]]


def test_true_count_of_per_head_ranks():
    layers = {"q": LayerSpec("q", 8, 5), "fc": LayerSpec("fc", 3, 7)}
    # q: 4 heads of 2 rows, ranks [1, 3, 0, 2]: A keeps 3 rows of 5, B keeps (1+3+0+2) columns of 2 rows
    assert true_parameter_count({"q": [1, 3, 0, 2], "fc": [2]}, layers) == 3 * 5 + 6 * 2 + 2 * (3 + 7)


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_t5", "tiny_gpt2", "tiny_resnet"])  # roberta: same family as bert
@pytest.mark.slow
def test_ard_lora_counts_true_parameters_meets_the_budget_and_reloads(family, tmp_path):
    from peft import PeftModel

    overrides = [*FAMILIES[family], *QUICK, "train.eval_every=0", "budget=r4", "method=ard_lora",
                 "method.alpha_lr=0.2"]
    run_dir = tmp_path / "ard"
    metrics = run_in_process(overrides, run_dir)
    cfg = compose_cfg(overrides)
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora = {k: t for k, t in saved.items() if "lora_" in k}
    # the saved PEFT form holds every counted parameter, plus zero B entries where a head's rank ends
    saved_total = sum(t.numel() for t in lora.values())
    assert saved_total == metrics["adapter_params_peft_form"]
    padding = 0
    for name, head_ranks in metrics["head_ranks"].items():
        (B,) = [t for k, t in lora.items() if k.endswith(f"{name}.lora_B.weight")]
        d_head = B.shape[0] // len(head_ranks)
        padding += sum(max(head_ranks) - r for r in head_ranks) * d_head
        for h, r in enumerate(head_ranks):
            assert B[h * d_head:(h + 1) * d_head, r:].abs().sum() == 0
    assert saved_total - padding == metrics["adapter_params"]
    assert metrics["adapter_params"] <= metrics["p_max"]
    # what trained: the rank-R adapter before the cut (regression: issue 13's reshaping first counted the cut one)
    torch.manual_seed(0)
    specs = adaptable_layers(build_model(cfg.model, cfg.task, build_tokenizer(cfg.model)), cfg.model.target_modules)
    r0 = metrics["p_max"] // sum(l.cost for l in specs)
    build_rank = min(math.ceil(cfg.method.alpha_max * r0), min(l.max_rank for l in specs))
    base = build_model(cfg.model, cfg.task, build_tokenizer(cfg.model))
    per_head = cfg.model.get("per_head_modules") if cfg.method.per_head else None
    scales = sum(head_groups(base, specs, per_head).values())  # the rank scales train too (one per layer or head)
    assert metrics["trainable_params"] == metrics["head_params"] + build_rank * sum(l.cost for l in specs) + scales
    if family != "tiny_resnet":
        assert metrics["head_ranks"]  # attention projections got per-head ranks
    reloaded = PeftModel.from_pretrained(load_base(cfg, run_dir), str(run_dir / "adapter"))
    for key, value in evaluate_independently(cfg, reloaded).items():
        assert value == pytest.approx(metrics[key], rel=1e-4), key


@pytest.mark.slow
def test_a_layer_narrower_than_the_build_rank_does_not_crash(tmp_path):
    """Regression: with ceil(alpha_max r0) above a layer's maximum rank the adapter was built at the clipped
    rank but the masks used the unclipped one: a shape error. tiny_bert's narrowest layers have rank 32; r0 = 8,
    alpha_max = 5 asks for 40."""
    metrics = run_in_process(["experiment=smoke", "method=ard_lora", "method.alpha_max=5", "budget=r8"],
                             tmp_path / "ard")
    assert 0 < metrics["adapter_params"] <= metrics["p_max"]
    assert max(max(r) for r in metrics["head_ranks"].values()) <= 32
