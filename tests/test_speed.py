"""Issue 15's speed settings: packed dropout masks, bf16 autocast on CPUs that have it, threads per sweep cell,
a compiled step, and what none of them may change (metrics in float32, statistics for allocation)."""

import json
import math

import pytest
import torch
from torch import nn

from lorambo.dropout import LANES, MaskDropout, drop_rate, keep_mask, use_mask_dropout
from tests.helpers import compose_cfg, run_in_process


def logged_losses(run_dir) -> list[float]:
    from lorambo.results import read_jsonl

    return [r["train/loss"] for r in read_jsonl(run_dir / "metrics_log.jsonl") if "train/loss" in r]


def binomial_bound(n: int, p: float, sigmas: float = 6.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_packed_masks_drop_at_their_rate_in_every_lane(p):
    """Each of the four 15-bit lanes of a 64-bit draw drops at p' (p rounded to 1/2**15). A lane that kept the
    draw's sign bit (or an int16 read as signed) would drop about half its entries."""
    torch.manual_seed(0)
    n = 1 << 20
    mask = keep_mask((n,), p, "cpu", torch.float32)
    rate = drop_rate(p)
    assert abs(rate - p) <= 0.5 / LANES
    dropped = mask == 0
    for lane in range(4):
        assert abs(float(dropped[lane::4].float().mean()) - rate) < binomial_bound(n // 4, rate)
    kept = mask[~dropped]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - rate)))
    assert abs(float(mask.mean()) - 1.0) < binomial_bound(n, rate) / (1 - rate)  # unbiased, as nn.Dropout


def test_packed_masks_are_independent_between_neighbours():
    """Neighbouring entries (lanes of one draw, and the last lane of a draw with the next draw's first) drop
    independently: P(both dropped) = p'^2 within binomial noise."""
    torch.manual_seed(1)
    n, p = 1 << 20, 0.25
    dropped = keep_mask((n,), p, "cpu", torch.float32) == 0
    both = float((dropped[:-1] & dropped[1:]).float().mean())
    assert abs(both - drop_rate(p) ** 2) < binomial_bound(n, drop_rate(p) ** 2)


def test_mask_dropout_is_dropout_in_training_and_identity_in_eval():
    torch.manual_seed(2)
    x = torch.randn(8, 16, 32, requires_grad=True)
    layer = MaskDropout(0.3)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    mask = keep_mask(x.shape, 0.3, "cpu", x.dtype)
    assert torch.equal(y, x * mask)  # the same generator, the same mask: reproducible from the seed
    y.sum().backward()
    assert torch.equal(x.grad, mask)  # the gradient passes where the value did, scaled alike
    layer.eval()
    assert layer(x) is x
    assert MaskDropout(0.0).train()(x) is x


def test_every_dropout_of_a_wrapped_model_becomes_packed_with_its_p(tmp_path):
    from lorambo.adapters import wrap_lora
    from lorambo.models import adaptable_layers, build_model, build_tokenizer

    cfg = compose_cfg(["experiment=smoke", "logger=none", "lora.dropout=0.05"])
    model = build_model(cfg.model, cfg.task, build_tokenizer(cfg.model))
    layers = adaptable_layers(model, cfg.model.target_modules)
    peft_model = wrap_lora(model, {spec.name: 2 for spec in layers}, cfg.model.head_modules, cfg.lora)
    before = {name: m.p for name, m in peft_model.named_modules() if type(m) is nn.Dropout and m.p > 0}
    assert any("lora_dropout" in name for name in before) and any("lora_" not in name for name in before)
    assert use_mask_dropout(peft_model) == len(before)
    after = {name: m.p for name, m in peft_model.named_modules() if isinstance(m, MaskDropout)}
    assert after == before  # the same modules, the same p (attention reads .p for its own kernel)
    assert not [m for m in peft_model.modules() if type(m) is nn.Dropout and m.p > 0]


@pytest.mark.slow
def test_a_run_with_torch_masks_keeps_nn_dropout_and_packed_masks_replace_it(tmp_path, monkeypatch):
    import lorambo.train

    counts = []
    real = lorambo.train.use_mask_dropout
    monkeypatch.setattr(lorambo.train, "use_mask_dropout", lambda model: counts.append(real(model)))
    run_in_process(["experiment=smoke", "train.max_steps=2", "train.dropout_masks=torch"], tmp_path / "torch")
    assert counts == []
    run_in_process(["experiment=smoke", "train.max_steps=2"], tmp_path / "packed")
    assert len(counts) == 1 and counts[0] > 0


def test_auto_precision_is_bf16_on_a_cpu_with_bf16_arithmetic_and_float32_without(monkeypatch):
    import lorambo.devices as devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert devices.resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert devices.resolve_mixed_precision("auto") == "no"
    assert devices.resolve_mixed_precision("bf16") == "bf16" and devices.resolve_mixed_precision("no") == "no"


def test_cpu_bf16_reads_the_kernel_flags_when_torch_has_no_probe(monkeypatch, tmp_path):
    import builtins

    import lorambo.devices as devices

    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    real_open = builtins.open
    for flags, expected in (("fpu avx512f amx_bf16 amx_tile", True), ("fpu avx2 avx512f", False)):
        info = tmp_path / f"cpuinfo_{expected}"
        info.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda path, *a, _i=info, **k: real_open(
            _i if path == "/proc/cpuinfo" else path, *a, **k))
        assert devices.cpu_has_bf16() is expected


def test_threads_default_to_cores_over_the_parallel_cells(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import lorambo.devices as devices
    from lorambo.config import CONF_DIR

    monkeypatch.setattr(devices, "machine_cores", lambda: 8)
    assert devices.default_threads() == 8  # no Hydra job: one run has the machine
    cases = (("parallel", None, 1), ("parallel", 2, 4), ("parallel", -2, 1), ("basic", None, 8))
    for launcher, n_jobs, expected in cases:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            overrides = [f"hydra/launcher={launcher}"] + ([f"hydra.launcher.n_jobs={n_jobs}"] if n_jobs else [])
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            assert devices.default_threads() == expected, (launcher, n_jobs)
        finally:
            HydraConfig.instance().cfg = None
    assert devices.set_threads(1) == 1 and torch.get_num_threads() == 1
    devices.set_threads(None)


@pytest.mark.slow
def test_bf16_training_keeps_float32_statistics_and_metrics_the_reloaded_adapter_reproduces(tmp_path):
    """Autocast runs the training step's matmuls in bf16 only: the allocator's statistics (taken before) are
    the float32 run's to the bit, the adapter is float32, and metrics.json holds the float32 evaluation that
    the saved adapter gives when reloaded (a perplexity: a bf16 evaluation would differ in the 3rd digit)."""
    from peft import PeftModel

    from tests.helpers import FAMILIES, QUICK, evaluate_independently, load_base

    common = [*FAMILIES["tiny_gpt2"], *QUICK, "train.eval_every=0", "allocator=gradient", "budget=r1",
              "sensitivity.gradient_batches=2"]
    runs = {}
    for precision in ("no", "bf16"):
        runs[precision] = run_in_process([*common, f"train.mixed_precision={precision}"], tmp_path / precision)
        assert runs[precision]["mixed_precision"] == precision
    stats = [json.loads((tmp_path / p / "sensitivities.json").read_text()) for p in ("no", "bf16")]
    assert stats[0] == stats[1]
    assert runs["no"]["ranks"] == runs["bf16"]["ranks"]
    assert runs["bf16"]["adapter_bytes"] == 4 * runs["bf16"]["adapter_params"]
    assert logged_losses(tmp_path / "no") != logged_losses(tmp_path / "bf16")  # the training step did run in bf16

    cfg = compose_cfg(["logger=none", *common])
    reloaded = PeftModel.from_pretrained(load_base(cfg, tmp_path / "bf16"), str(tmp_path / "bf16" / "adapter"))
    got = evaluate_independently(cfg, reloaded)
    assert got["perplexity"] == pytest.approx(runs["bf16"]["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_a_compiled_step_recompiles_through_online_growth_and_matches_eager(tmp_path):
    """Growth changes the shapes of the adapter's tensors mid-run: the compiled model must follow them (dynamo
    recompiles on the changed shapes) and train as the eager one does. The `eager` backend traces with dynamo
    as inductor does, without inductor's minutes of code generation."""
    common = ["experiment=smoke", "allocator=hessian_online", "train.max_steps=6", "method.growth_events=2",
              "task.max_length=12",  # most batches at the cap: one shape, so recompiles come from growth
              "train.mixed_precision=no"]
    eager = run_in_process(common, tmp_path / "eager")
    compiled = run_in_process([*common, "train.compile=true", "train.compile_backend=eager"], tmp_path / "compiled")
    assert compiled["growth_events"] == eager["growth_events"] >= 1
    assert compiled["ranks"] == eager["ranks"] and len(set(eager["ranks"].values())) > 1
    losses = [logged_losses(tmp_path / d) for d in ("eager", "compiled")]
    assert len(losses[0]) >= 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
