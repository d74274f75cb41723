"""The benchmark harness (bench/harness.py): its FLOP count against torch's own counter, and that it runs and
reports every goal row. No timing is asserted here; `make bench` measures."""

import json

import pytest
import torch

from tests.helpers import bench_script, call_main


@pytest.fixture(scope="module")
def harness():
    return bench_script("harness")


@pytest.mark.slow
def test_lora_step_flop_count_matches_torch_flop_counter(harness):
    from torch.utils.flop_counter import FlopCounterMode

    from lorambo.adapters import wrap_lora
    from lorambo.allocators import allocate
    from lorambo.budget import resolve_p_max
    from lorambo.models import adaptable_layers

    cfg, model, batches = harness.setting(["budget=r8"], batch_size=4, n_batches=1)
    layers = adaptable_layers(model, cfg.model.target_modules)
    lora = wrap_lora(model, allocate("uniform", layers, resolve_p_max(cfg.budget, layers)),
                     cfg.model.head_modules, cfg.lora)
    lora.eval()  # no dropout: the counter sees the same matmuls either way
    counter = FlopCounterMode(display=False)
    with counter:
        lora(**batches[0]).loss.backward()
    counted = counter.get_total_flops()
    ours = harness.encoder_step_flop(lora.base_model.model, batches[0])
    # ours leaves out LoRA's factors and the head's weight gradients; torch's counter leaves out CPU attention
    assert ours == pytest.approx(counted, rel=0.03)


def harness_main(harness, args, monkeypatch, capsys):
    """(exit code, stdout, stderr) of `bench/harness.py ARGS`, through its main() in this process."""
    return call_main(harness.main, ["harness.py", *args], monkeypatch, capsys)


@pytest.mark.slow
def test_harness_prints_every_goal_row_and_json(harness, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    code, stdout, stderr = harness_main(harness, ["--only", "allocation,grown_vs_direct", "--repeats", "2", "--steps",
                                                  "2", "--batch-size", "4", "--json", str(out)], monkeypatch, capsys)
    assert code == 0, stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(stdout.strip().splitlines()[-1]) == result
    table = stdout
    assert "step: grown online / built at final ranks" in table
    assert "allocation s, 100 layers" in table and "allocation s, 1000 layers" in table
    ratio = result["grown_vs_direct"]["ratio"]
    assert ratio["n"] == 2 and ratio["median"] > 0
    assert set(result["allocation"]) == {f"{a}_{n}" for n in (100, 1000) for a in
                                         ("uniform", "frobenius_greedy", "gradient", "hessian_offline",
                                          "data_weighted")}


def test_unknown_part_is_a_one_line_error(harness, monkeypatch, capsys):
    code, _, stderr = harness_main(harness, ["--only", "nope"], monkeypatch, capsys)
    assert code == 2 and "unknown part nope" in stderr


def test_profile_split_finds_the_dropout_masks_and_sums_to_all_of_the_step(harness):
    """The split the harness reports: random number generation is there when a step draws dropout masks (torch's
    or the packed ones) and absent when it draws none, and the categories add up to the whole step."""
    from lorambo.dropout import use_mask_dropout

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Dropout(0.1), torch.nn.GELU(), torch.nn.Linear(256, 2))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)  # on CPU: the per-tensor loop, no _foreach_

    def step(x):
        net(x).sum().backward()
        torch.nn.utils.clip_grad_norm_(list(net.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = [torch.randn(512, 64) for _ in range(3)]
    shares = {}
    for name in ("torch", "packed", "none"):
        if name == "packed":
            use_mask_dropout(net)
        net.train(name != "none")
        split = harness.profile_split(step, batches)["percent"]
        assert sum(split.values()) == pytest.approx(100)
        shares[name] = split
    assert shares["torch"]["rng"] > 0 and shares["packed"]["rng"] > 0 and shares["none"]["rng"] == 0
    assert all(s["matmul"] > 0 and s["optimizer"] > 0 for s in shares.values())
    assert harness.op_category("aten::bernoulli_") == "rng" and harness.op_category("aten::addmm") == "matmul"


def test_paired_ratio_is_the_median_of_per_round_ratios(harness):
    a = [[2.0, 2.2], [4.0, 4.0], [3.0, 3.0]]  # the machine slowed in round 2 for both
    b = [[1.0, 1.1], [2.0, 2.0], [1.0, 1.0]]
    assert harness.paired_ratio(a, b)["median"] == pytest.approx(2.0)


def test_the_spread_allocation_has_uniforms_parameters_exactly(harness):
    from lorambo.budget import LayerSpec

    layers = [LayerSpec(f"attn{i}", 64, 64) for i in range(12)] + [LayerSpec(f"ffn{i}", 256, 64) for i in range(12)]
    uniform = {l.name: 4 for l in layers}
    spread = harness.spread_at_equal_parameters(uniform, layers)
    cost = {l.name: l.cost for l in layers}
    assert sum(r * cost[n] for n, r in spread.items()) == sum(r * cost[n] for n, r in uniform.items())
    assert 1 <= min(spread.values()) < 4 < max(spread.values()) <= 14 and set(spread) == set(uniform)
