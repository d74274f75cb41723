"""lorambo's benchmark harness (`make bench`): what choosing an allocator costs beyond a plain LoRA run.

Everything is measured in this one process, on this machine. Things compared with each other are timed
interleaved (blocks of steps over the same batches, in alternating order), and every figure is a median over
repeats after warm-up, with its interquartile range (IQR). Prints a table of ratios and percentages, then the
same as JSON on the last line (and to --json FILE if given).

    .venv/bin/python bench/harness.py [--repeats 8] [--steps 5] [--only minilm_vs_peft,...] [--json FILE]

Parts (--only): minilm_vs_peft, tiny_gpt2_vs_peft, grown_vs_direct, sensitivity, allocation, full_ft,
step_speed, nonuniform_step, real_bases, compile, sweep, offline_default. The last two time whole lorambo-run commands (about 25 and 8 minutes
here); run the harness alone on the machine.
"""

import argparse
import copy
import json
import os
import statistics
import time

import numpy as np
import torch
from omegaconf import OmegaConf

import lorambo  # noqa: F401  (torchvision fix)
from lorambo.adapters import grow_rank, lora_layers, wrap_lora
from lorambo.allocation import allocator_options, estimation_batches
from lorambo.allocators import allocate
from lorambo.budget import LayerSpec, resolve_p_max
from lorambo.config import compose_config
from lorambo.data import load_task
from lorambo.devices import prepare, resolve_mixed_precision
from lorambo.dropout import use_mask_dropout
from lorambo.evaluation import evaluate, loss_and_logits
from lorambo.methods import build_method
from lorambo.models import adaptable_layers, build_model, build_tokenizer
from lorambo.optimizers import build_optimizer
from lorambo.results import optimizer_state_bytes
from lorambo.sensitivity import estimate
from lorambo.train import train_step


def spread(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "iqr": q[2] - q[0], "n": len(times)}


def interleaved(steppers: dict, batches, repeats: int, samples_out: dict | None = None,
                rounds_out: dict | None = None) -> dict:
    """Median step time of each stepper: two warm-up steps each, then `repeats` rounds in which every stepper
    runs all `batches`, the order of the steppers reversed every other round. With two steppers, also their
    ratio as the median over rounds of the ratio of the round's medians (paired in time, so slow drifts of the
    machine cancel), with that ratio's IQR over rounds."""
    for step in steppers.values():
        for batch in batches[:2]:
            step(batch)
    rounds = {name: [] for name in steppers}
    names = list(steppers)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times = []
            for batch in batches:
                start = time.perf_counter()
                steppers[name](batch)
                times.append(time.perf_counter() - start)
            rounds[name].append(times)
    samples = {name: [t for r in rs for t in r] for name, rs in rounds.items()}
    if samples_out is not None:
        samples_out.update(samples)
    if rounds_out is not None:
        rounds_out.update(rounds)
    out = {name: spread(times) for name, times in samples.items()}
    if len(names) == 2:
        out["ratio"] = paired_ratio(rounds[names[0]], rounds[names[1]])
    return out


def paired_ratio(a_rounds, b_rounds) -> dict:
    """Median over rounds of (a's median step / b's) in the same round: paired in time, so drifts cancel."""
    return spread([statistics.median(x) / statistics.median(y) for x, y in zip(a_rounds, b_rounds)])


def adamw_step(model, optimizer, params, clip: float = 1.0, scheduler=None):
    """The step a PEFT user writes: forward, backward, clip `params()`, optimizer (and schedule) step, zero."""
    def step(batch):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def plain_stepper(model, lr: float = 1e-4, precision: str = "no"):
    """A plain loop over a PEFT model: AdamW on its trainable parameters with a linear schedule (the forward
    under bf16 autocast when `precision` is bf16, as accelerate does)."""
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    if precision == "bf16":
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    return adamw_step(model, optimizer, lambda: trainable,
                      scheduler=get_linear_schedule_with_warmup(optimizer, 0, 10**6))


def lorambo_stepper(model, cfg):
    """lorambo's own training step: its model wrapper, accelerate at the configured precision, its dropout
    masks (train.dropout_masks), and train.train_step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import get_linear_schedule_with_warmup

    if cfg.train.dropout_masks == "packed":
        use_mask_dropout(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10**6)
    # accelerate keeps one state per process: accelerator.autocast() reads the precision of the last accelerator
    # made, so a process may mix float32 steppers (no autocast at all) with steppers of one other precision
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision), cpu=True,
                              dynamo_backend=cfg.train.compile_backend if cfg.train.compile else None)
    model, optimizer, scheduler = prepare(accelerator, model, optimizer, scheduler)
    model.train()
    method = build_method(cfg, [], 10**6, "", False)  # the configured method's hooks (LoRA: none in a step)
    return lambda batch: train_step(model, batch, optimizer, scheduler, accelerator, cfg, method, 1, trainable)


def setting(overrides, batch_size: int, n_batches: int, max_length: int | None = 64):
    """Config, base model (seed 0) and the first `n_batches` training batches of a lorambo configuration."""
    length = [f"task.max_length={max_length}"] if max_length else []
    cfg = compose_config(["logger=none", "task.max_train_samples=2000", *length, *overrides])
    tokenizer = build_tokenizer(cfg.model)
    data = load_task(cfg.task, cfg.model, tokenizer)
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, collate_fn=data.collate_fn)
    batches = [b for _, b in zip(range(n_batches), loader)]
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, tokenizer)
    return cfg, model, batches


def lorambo_vs_peft(overrides, args) -> dict:
    """lorambo's LoRA step against plain PEFT (get_peft_model, same ranks and layers) in a plain loop."""
    from peft import LoraConfig, get_peft_model

    cfg, model, batches = setting(overrides, args.batch_size, args.steps)
    layers = adaptable_layers(model, cfg.model.target_modules)
    ranks = allocate("uniform", layers, resolve_p_max(cfg.budget, layers))
    plain = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=max(ranks.values()), lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=sorted(ranks), modules_to_save=list(cfg.model.head_modules) or None))
    ours = wrap_lora(model, ranks, cfg.model.head_modules, cfg.lora)
    precision = resolve_mixed_precision(cfg.train.mixed_precision)
    times = interleaved({"lorambo": lorambo_stepper(ours, cfg), "peft": plain_stepper(plain, precision=precision)},
                        batches, args.repeats)
    return {**times, "rank": max(ranks.values()), "layers": len(ranks), "precision": precision,
            "dropout_masks": cfg.train.dropout_masks}


def grown_vs_direct(args) -> dict:
    """A LoRA grown online (every layer at rank 4, then every other layer grown to 8 by grow_rank after a
    first optimizer step, as hessian_online does) against one built directly at those final ranks."""
    cfg, model, batches = setting(["budget=r4"], args.batch_size, args.steps)
    layers = adaptable_layers(model, cfg.model.target_modules)
    start = {l.name: 4 for l in layers}
    final = {l.name: 8 if i % 2 == 0 else 4 for i, l in enumerate(layers)}
    direct = wrap_lora(copy.deepcopy(model), final, cfg.model.head_modules, cfg.lora)
    grown = wrap_lora(model, start, cfg.model.head_modules, cfg.lora)
    trainable = [p for p in grown.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    grown.train()
    grown(**batches[0]).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    spec = {l.name: l for l in layers}
    for name, layer in lora_layers(grown).items():
        if final[name] > start[name]:
            grow_rank(layer, 0.01 * torch.randn(final[name] - start[name], spec[name].d_in), optimizer)
    ranks = {n: l.lora_A["default"].weight.shape[0] for n, l in lora_layers(grown).items()}
    assert ranks == final, "growth did not reach the final ranks"

    # the same optimizer object, carried through growth as in a run; it holds the grown tensors
    grown_step = adamw_step(grown, optimizer, lambda: [p for g in optimizer.param_groups for p in g["params"]])
    direct_trainable = [p for p in direct.parameters() if p.requires_grad]
    direct.train()
    direct_step = adamw_step(direct, torch.optim.AdamW(direct_trainable, lr=1e-4), lambda: direct_trainable)

    times = interleaved({"grown": grown_step, "direct": direct_step}, batches, args.repeats)
    return times


class NoGather:  # evaluate() gathers through accelerate; one process needs no gathering
    def gather_for_metrics(self, x):
        return x


def sensitivity_share(args) -> dict:
    """Seconds of each estimator at the default settings (config `sensitivity:`, batches of train.batch_size),
    as a percentage of the offline default run's wall time, measured here by its parts: data and model
    loading + one epoch of LoRA steps (median step x steps) + the validation pass."""
    cfg = compose_config(["logger=none"])
    tokenizer = build_tokenizer(cfg.model)
    start = time.perf_counter()
    data = load_task(cfg.task, cfg.model, tokenizer)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, tokenizer)
    load_seconds = time.perf_counter() - start
    layers = adaptable_layers(model, cfg.model.target_modules)
    s = cfg.sensitivity
    batches = estimation_batches(data, cfg, "cpu")  # the runner's own

    def output_fn(m, b):
        return loss_and_logits(m, b, cfg.task.type)

    out = {}
    estimators = (("gradient", "gradient"), ("hutchinson", "hessian_trace"), ("fisher", "fisher_trace"),
                  ("covariance", "weighted_spectra"))
    for name, stat in estimators:
        runs = []
        for _ in range(args.sensitivity_repeats + 1):  # the first is warm-up
            start = time.perf_counter()
            estimate({stat}, model, layers, batches, output_fn, s, 0, cfg.task.type)
            runs.append(time.perf_counter() - start)
        out[name] = spread(runs[1:])
    ranks = allocate("uniform", layers, resolve_p_max(cfg.budget, layers))
    lora = wrap_lora(model, ranks, cfg.model.head_modules, cfg.lora)
    step = interleaved({"default": lorambo_stepper(lora, cfg)}, batches, max(2, args.repeats // 2))["default"]
    steps = len(data.train) // cfg.train.batch_size * cfg.train.epochs
    eval_loader = torch.utils.data.DataLoader(data.evals["validation"], batch_size=cfg.train.eval_batch_size,
                                              collate_fn=data.collate_fn)
    start = time.perf_counter()
    evaluate(lora, eval_loader, cfg.task, NoGather())
    eval_seconds = time.perf_counter() - start
    wall = load_seconds + steps * step["median"] + eval_seconds
    for name, _ in estimators:
        out[name]["percent_of_run"] = 100 * out[name]["median"] / wall
    torch.manual_seed(0)
    growth = online_growth_cost(cfg, build_model(cfg.model, cfg.task, tokenizer), layers, batches, output_fn)
    growth["percent_of_run"] = 100 * growth["total_seconds"] / wall
    return {**out, "growth": growth, "default_run_seconds": wall, "steps": steps, "step": step,
            "load_seconds": load_seconds, "eval_seconds": eval_seconds, "settings": dict(s)}


def online_growth_cost(cfg, base_model, layers, batches, output_fn) -> dict:
    """hessian_online's own work beyond its curvature estimate, at the default settings: each growth event's
    measuring step (its extra over a plain step on the same batch just before) and its decision + growth, for
    all `growth_events` events."""
    import tempfile

    from accelerate import Accelerator

    from lorambo.methods.growth import OnlineGrowth

    online = compose_config(["allocator=hessian_online"])  # its start, and the growth method's settings
    a = OmegaConf.create(OmegaConf.to_container(online.method, resolve=True))
    p_max = resolve_p_max(cfg.budget, layers)
    stats = estimate({a.curvature}, base_model, layers, batches, output_fn, cfg.sensitivity, 0, cfg.task.type)
    ranks = allocate("hessian_online", layers, p_max, stats, **allocator_options(online.allocator))
    model = wrap_lora(copy.deepcopy(base_model), ranks, cfg.model.head_modules, cfg.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    model.train()
    measuring, plain, deciding = [], [], []

    step = adamw_step(model, optimizer, lambda: trainable)

    with tempfile.TemporaryDirectory() as run_dir:
        options = OmegaConf.merge(a, {"grow_every": 1})  # one event per measured step here
        growth = OnlineGrowth(layers, p_max, stats[f"{a.curvature}_raw"], options, run_dir, a.growth_events)
        for event in range(a.growth_events):
            batch = batches[event % len(batches)]
            step(batch)  # warm
            start = time.perf_counter()
            step(batch)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            with growth.measuring(model):
                step(batch)
            measuring.append(time.perf_counter() - start)
            start = time.perf_counter()
            growth.grow(event + 1, model, optimizer, accelerator)
            deciding.append(time.perf_counter() - start)
    extra = [max(0.0, m - p) for m, p in zip(measuring, plain)]
    return {"events": a.growth_events, "measuring_step": spread(measuring), "plain_step": spread(plain),
            "grow": spread(deciding),
            "total_seconds": sum(extra) + sum(deciding)}


def random_layers(n: int, rng) -> list[LayerSpec]:
    return [LayerSpec(f"l{i}", int(rng.integers(64, 4096)), int(rng.integers(64, 4096))) for i in range(n)]


def allocation_time(args) -> dict:
    """Allocation alone (no model), for layers of random shapes and random statistics: 100 and 1000 layers,
    budget = rank 8 everywhere."""
    rng = np.random.default_rng(0)
    out = {}
    for n in (100, 1000):
        layers = random_layers(n, rng)
        p_max = 8 * sum(l.cost for l in layers)

        def spectrum(l):
            return np.sort(rng.random(l.max_rank))[::-1]

        stats = {"gradient": {l.name: float(rng.random()) for l in layers},
                 "hessian_trace": {l.name: float(rng.random()) for l in layers},
                 "weight_spectra": {l.name: spectrum(l) for l in layers},
                 "update_spectra": {l.name: spectrum(l) for l in layers},
                 "weighted_spectra": {l.name: spectrum(l) for l in layers}}
        for name in ("uniform", "frobenius_greedy", "gradient", "hessian_offline", "data_weighted"):
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                allocate(name, layers, p_max, stats)
                runs.append(time.perf_counter() - start)
            out[f"{name}_{n}"] = spread(runs)
    return out


def full_ft_optimizers(args) -> dict:
    """AdamW, GaLore r=4 and AdaRankGrad (initial rank 4) training every weight of MiniLM, with lorambo's
    parameter groups (adaptable matrices projected, the rest plain Adam) and its configs' settings."""
    cfg, model, batches = setting(["method=full_ft"], args.batch_size, args.steps)
    layers = adaptable_layers(model, cfg.model.target_modules)
    steppers, optimizers, rank_means = {}, {}, {}
    for name in ("adamw", "galore", "adarankgrad"):
        m = copy.deepcopy(model)
        m.train()
        params = list(m.parameters())
        run_cfg = compose_config(["method=full_ft", f"optimizer={name}"])
        method = build_method(run_cfg, layers, args.steps, "", False)  # the runner's own parameter groups
        method.wrap(m, None, {}, {})
        opt = build_optimizer(run_cfg.optimizer, run_cfg.train, method.param_groups(m))
        rank_means[name] = []

        def step(batch, plain=adamw_step(m, opt, lambda params=params: params), opt=opt, name=name):
            plain(batch)
            if name != "adamw":
                rank_means[name].append(statistics.mean(opt.projection_ranks().values()))

        steppers[name], optimizers[name] = step, opt
    times = interleaved(steppers, batches, args.repeats)
    out = {}
    for name, opt in optimizers.items():
        out[name] = {**times[name], "state_bytes": optimizer_state_bytes(opt),
                     "step_ratio_vs_adamw": times[name]["median"] / times["adamw"]["median"]}
        if rank_means[name]:
            out[name]["average_effective_rank"] = statistics.mean(rank_means[name])
    return out


def encoder_step_flop(model, batch) -> float:
    """FLOP of one LoRA training step of a BERT-style encoder, counted from shapes (padded tokens included:
    they are computed). Forward: 2 x weights per token for every Linear, 4 x length x width per token per layer
    for attention scores and mixing. Backward: frozen weights need only the gradient to their input (1x their
    forward, not the 2x of full training); attention needs both operands' gradients (2x its forward). LoRA's
    own factors and the head's weight gradients are under 1% and left out."""
    c = model.config
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in n)
    batch_size, length = batch["input_ids"].shape
    tokens = batch_size * length
    attention = 4 * length * c.hidden_size * c.num_hidden_layers * tokens
    return 2 * (2 * linear * tokens) + 3 * attention


# --- issue 15: what a step costs, by precision and dropout masks; compiled steps; sweeps; the default run

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
              "aten::convolution", "aten::mkldnn_convolution", "aten::convolution_backward"}
RNG_OPS = {"aten::bernoulli_", "aten::random_", "aten::uniform_", "aten::normal_", "aten::native_dropout"}


def op_category(name: str, scopes: tuple[str, ...] = ()) -> str:
    """matmul, rng (random number generation: dropout masks), optimizer (any op inside the optimizer's step or
    zero_grad, and the _foreach_ kernels of gradient clipping) or other (elementwise, copies and casts, norms,
    softmax, ...). `scopes`: the names of the op's enclosing profiler ranges."""
    if any(scope.startswith("Optimizer.") for scope in scopes) or name.startswith("aten::_foreach_"):
        return "optimizer"
    if name in MATMUL_OPS:
        return "matmul"
    if name in RNG_OPS:
        return "rng"
    return "other"


def profile_split(step, batches) -> dict:
    """Share of the step's self CPU time by op category (op_category), and the top operators, over `batches`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            step(batch)
    split, by_op = dict.fromkeys(("matmul", "rng", "optimizer", "other"), 0.0), {}
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        scopes, parent = [], event.cpu_parent
        while parent is not None:
            scopes.append(parent.name)
            parent = parent.cpu_parent
        split[op_category(event.name, tuple(scopes))] += event.self_cpu_time_total
        by_op[event.name] = by_op.get(event.name, 0.0) + event.self_cpu_time_total
    total = sum(split.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:6]
    return {"percent": {k: 100 * v / total for k, v in split.items()},
            "top": [(name, 100 * t / total) for name, t in top], "ms_per_step": total / 1000 / len(batches)}


def linear_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every frozen Linear of the base model (LoRA's own factors left out)."""
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in n]


def reference_matmuls(shapes, tokens: int, dtype):
    """A stepper doing the forward matmuls of `shapes` for `tokens` tokens in `dtype` (the model's own shapes,
    in the precision in use), and its FLOP per call (2 x tokens x in x out, summed): the reference rate a
    step's rate is read against."""
    torch.manual_seed(0)
    pairs = [(torch.randn(tokens, i, dtype=dtype), torch.randn(i, o, dtype=dtype)) for i, o in shapes]

    def step(_batch):
        for x, w in pairs:
            x @ w
    return step, 2.0 * tokens * sum(i * o for i, o in shapes)


BEFORE = ["train.mixed_precision=no", "train.dropout_masks=torch", "lora.dropout=0.05"]  # before issue 15
STEP_VARIANTS = {  # name: overrides; the first is the step before issue 15, the others are read against it
    "before: fp32, torch masks, lora.dropout 0.05": BEFORE,
    "fp32, packed masks, lora.dropout 0.05": ["train.mixed_precision=no", "lora.dropout=0.05"],
    "bf16, torch masks, lora.dropout 0.05": ["train.mixed_precision=bf16", "train.dropout_masks=torch",
                                             "lora.dropout=0.05"],
    "bf16, packed masks, lora.dropout 0.05": ["train.mixed_precision=bf16", "lora.dropout=0.05"],
    "default: bf16, packed masks, lora.dropout 0": ["train.mixed_precision=bf16"],
}
DEFAULT_VARIANT = "default: bf16, packed masks, lora.dropout 0"


def step_speed(args) -> dict:
    """MiniLM LoRA r8 on the offline default's batches (16 x up to 64 tokens): each STEP_VARIANTS step and the
    reference matmuls of both precisions, interleaved; each variant's speed-up over the first (paired by
    round), each step's FLOP rate over its precision's reference, and the profile split of the first and of
    the default."""
    base_cfg, model, batches = setting(["budget=r8"], 16, args.steps)
    layers = adaptable_layers(model, base_cfg.model.target_modules)
    ranks = allocate("uniform", layers, resolve_p_max(base_cfg.budget, layers))
    steppers, precisions = {}, {}
    for name, overrides in STEP_VARIANTS.items():
        cfg = compose_config(["logger=none", "budget=r8", *overrides])
        lora = wrap_lora(copy.deepcopy(model), ranks, cfg.model.head_modules, cfg.lora)
        steppers[name], precisions[name] = lorambo_stepper(lora, cfg), cfg.train.mixed_precision
    tokens = int(statistics.median(b["input_ids"].numel() for b in batches))
    shapes = linear_shapes(model)
    references = {f"matmul_{precision}": reference_matmuls(shapes, tokens, dtype)[0]
                  for precision, dtype in (("no", torch.float32), ("bf16", torch.bfloat16))}
    ref_flop = 2.0 * tokens * sum(i * o for i, o in shapes)
    rounds = {}
    times = interleaved({**steppers, **references}, batches, args.repeats, rounds_out=rounds)
    first = next(iter(STEP_VARIANTS))
    flop = statistics.mean(encoder_step_flop(model, b) for b in batches)
    out = {"tokens_per_batch_median": tokens, "flop_per_step": flop, "reference_flop": ref_flop, "variants": {}}
    for name in STEP_VARIANTS:
        ref = f"matmul_{precisions[name]}"
        out["variants"][name] = {
            **times[name], "speedup_vs_first": paired_ratio(rounds[first], rounds[name]),
            "fraction_of_reference": spread([(flop / statistics.median(a)) / (ref_flop / statistics.median(b))
                                             for a, b in zip(rounds[name], rounds[ref])]),
        }
    for precision in ("no", "bf16"):
        ref = times[f"matmul_{precision}"]
        out[f"reference_{precision}"] = {**ref, "flop_per_s": ref_flop / ref["median"]}
    out["profile"] = {name: profile_split(steppers[name], batches) for name in STEP_VARIANTS}  # after each change
    return out


def spread_at_equal_parameters(ranks: dict[str, int], layers, low: int = 1, high: int = 14, seed: int = 0) -> dict:
    """`ranks` (uniform) respread between `low` and `high` at exactly the same parameter count: one rank moved at a
    time between two layers of the same cost (the spread of hessian_offline's and data_weighted's allocations on
    MiniLM, ranks 1-14, without their budget slack)."""
    import random

    rng, cost, spread = random.Random(seed), {l.name: l.cost for l in layers}, dict(ranks)
    names = sorted(spread)
    for _ in range(50 * len(names)):
        a, b = rng.sample(names, 2)
        if cost[a] == cost[b] and spread[a] > low and spread[b] < high:
            spread[a], spread[b] = spread[a] - 1, spread[b] + 1
    return spread


def nonuniform_step(args) -> dict:
    """MiniLM LoRA at r4's budget: the step of uniform rank 4 against a spread allocation (ranks 1-14) of exactly the
    same parameter count, interleaved at the default precision (and at bf16 when the CPU has bf16 arithmetic and
    the default is float32, or float32 when the default is bf16), as a ratio paired by round."""
    from lorambo.devices import cpu_has_bf16

    cfg, model, batches = setting(["budget=r4"], 16, args.steps)
    layers = adaptable_layers(model, cfg.model.target_modules)
    uniform = allocate("uniform", layers, resolve_p_max(cfg.budget, layers))
    spread = spread_at_equal_parameters(uniform, layers)
    cost = {l.name: l.cost for l in layers}
    out = {"parameters": sum(r * cost[n] for n, r in uniform.items()),
           "spread_parameters": sum(r * cost[n] for n, r in spread.items()),
           "spread_ranks": sorted(spread.values())}
    precisions = [resolve_mixed_precision(cfg.train.mixed_precision)]
    if cpu_has_bf16():
        precisions.append("no" if precisions[0] == "bf16" else "bf16")
    for precision in precisions:
        pcfg = compose_config(["logger=none", "budget=r4", f"train.mixed_precision={precision}"])
        steppers = {name: lorambo_stepper(wrap_lora(copy.deepcopy(model), ranks, pcfg.model.head_modules, pcfg.lora,
                                                    False, 4), pcfg)
                    for name, ranks in (("spread", spread), ("uniform", uniform))}
        out[precision] = interleaved(steppers, batches, args.repeats)
    return out


REAL_BASES = {  # the real pretrained bases at their tables' batches: (overrides, batch size, tokens or None)
    "smollm2 (arithmetic)": (["model=smollm2", "task=arithmetic", "budget=r4"], 8, 96),
    "mpnet (rt_snippets)": (["model=mpnet", "task=rt_snippets", "budget=r4"], 16, 64),
    "efficientnet_lite0 (fashion_mnist)": (["model=efficientnet_lite0", "task=fashion_mnist", "budget=r4"], 32, None),
}


def real_bases(args) -> dict:
    """The training step of uniform LoRA at r4 on each real pretrained base (the default precision); for an
    instruct task also against the same step taking logits at every position (the model's own loss: the step as
    task type lm takes it), interleaved, as a ratio paired by round."""
    out = {}
    for name, (overrides, batch_size, max_length) in REAL_BASES.items():
        cfg, model, batches = setting(overrides, batch_size, args.steps, max_length)
        layers = adaptable_layers(model, cfg.model.target_modules)
        ranks = allocate("uniform", layers, resolve_p_max(cfg.budget, layers))
        variants = {"step": cfg}
        if cfg.task.type == "instruct":
            every = copy.deepcopy(cfg)
            every.task.type = "lm"  # training_loss then asks the model for its own loss, from every position
            variants = {"responses' logits": cfg, "every position's logits": every}
        steppers = {label: lorambo_stepper(wrap_lora(copy.deepcopy(model), ranks, c.model.head_modules, c.lora), c)
                    for label, c in variants.items()}
        out[name] = interleaved(steppers, batches, args.repeats)
        out[name]["tokens"] = [int(b["input_ids"].numel()) for b in batches] if max_length else None
    return out


COMPILE_FAMILIES = {  # family: (overrides, max_length) (MiniLM pretrained; causal LM and vision: the tiny configs)
    "encoder (minilm)": (["budget=r8"], 64),
    "causal_lm (tiny_gpt2)": (["model=tiny_gpt2", "task=wiki_summaries", "budget=r8"], 64),
    "vision (tiny_resnet)": (["model=tiny_resnet", "task=fashion_mnist", "budget=r8"], None),
}
TYPICAL_RUN_STEPS = 528  # the offline default's epoch


def compiled_vs_eager(args) -> dict:
    """Per model family: torch.compile (inductor, through train.compile) against the eager step at the default
    precision: the compile seconds (the first pass over the batches, each new shape compiling, less that pass
    at the compiled speed), the per-step ratio after it, and the steps a run needs before compiling pays."""
    out = {}
    for family, (overrides, max_length) in COMPILE_FAMILIES.items():
        base_cfg, model, batches = setting(overrides, 16, args.steps, max_length)
        layers = adaptable_layers(model, base_cfg.model.target_modules)
        ranks = allocate("uniform", layers, resolve_p_max(base_cfg.budget, layers))
        steppers = {}
        for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
            cfg = compose_config(["logger=none", *overrides, *extra])
            steppers[name] = lorambo_stepper(wrap_lora(copy.deepcopy(model), ranks, cfg.model.head_modules,
                                                       cfg.lora), cfg)
        first_pass = {}
        for name, step in steppers.items():
            start = time.perf_counter()
            for batch in batches:
                step(batch)
            first_pass[name] = time.perf_counter() - start
        times = interleaved({"compiled": steppers["compiled"], "eager": steppers["eager"]}, batches,
                            args.repeats)
        compile_seconds = first_pass["compiled"] - len(batches) * times["compiled"]["median"]
        saved = times["eager"]["median"] - times["compiled"]["median"]
        out[family] = {**times, "compile_seconds": compile_seconds,
                       "break_even_steps": compile_seconds / saved if saved > 0 else None,
                       "typical_run_ratio": (compile_seconds + TYPICAL_RUN_STEPS * times["compiled"]["median"])
                       / (TYPICAL_RUN_STEPS * times["eager"]["median"])}
    return out




def timed_command(args: list[str], cwd: str) -> float:
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "lorambo-run")
    start = time.perf_counter()
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lorambo-run {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def sweep_cells_per_hour(args) -> dict:
    """`experiment=table1_cpu` narrowed to one seed (8 cells), as whole commands: the settings before issue 15
    run one cell after another, today's defaults one after another, and today's defaults side by side
    (hydra/launcher=parallel)."""
    import tempfile

    from lorambo.config import preset_cells

    cells = len(preset_cells("table1_cpu", ["seed=0"]))
    runs = {"before_sequential": BEFORE, "now_sequential": [], "now_side_by_side": ["hydra/launcher=parallel"]}
    out = {"cells": cells}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs.items():
            seconds = timed_command(["experiment=table1_cpu", "seed=0", *extra, f"hydra.sweep.dir={tmp}/{name}"],
                                    tmp)
            out[name] = {"seconds": seconds, "cells_per_hour": cells * 3600 / seconds}
    for name in ("now_sequential", "now_side_by_side"):
        out[name]["ratio_vs_before"] = out[name]["cells_per_hour"] / out["before_sequential"]["cells_per_hour"]
    return out


def offline_default_wall(args) -> dict:
    """The offline default run (`lorambo-run`, as `make demo` runs it) as a whole command: with the settings
    before issue 15 and with today's defaults, one after the other, with each one's accuracy."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("before", BEFORE), ("now", [])):
            seconds = timed_command([*extra, f"hydra.run.dir={tmp}/{name}"], tmp)
            with open(os.path.join(tmp, name, "metrics.json")) as f:
                out[name] = {"seconds": seconds, "accuracy": json.load(f)["accuracy"]}
    out["ratio"] = out["now"]["seconds"] / out["before"]["seconds"]
    return out


PARTS = {
    "minilm_vs_peft": lambda args: lorambo_vs_peft(["budget=r8"], args),
    "tiny_gpt2_vs_peft": lambda args: lorambo_vs_peft(["model=tiny_gpt2", "task=wiki_summaries", "budget=r8"], args),
    "grown_vs_direct": grown_vs_direct,
    "sensitivity": sensitivity_share,
    "allocation": allocation_time,
    "full_ft": full_ft_optimizers,
    "step_speed": step_speed,
    "nonuniform_step": nonuniform_step,
    "real_bases": real_bases,
    "compile": compiled_vs_eager,
    "sweep": sweep_cells_per_hour,
    "offline_default": offline_default_wall,
}


def table_rows(r: dict) -> list[tuple[str, float, float | None, str]]:
    """(measure, value, IQR or None, goal) for every part that ran."""
    rows = []

    for key, label in (("minilm_vs_peft", "lorambo / plain PEFT, MiniLM"),
                       ("tiny_gpt2_vs_peft", "lorambo / plain PEFT, tiny GPT-2"),
                       ("grown_vs_direct", "grown online / built at final ranks")):
        if key in r:
            rows.append((f"step: {label}", r[key]["ratio"]["median"], r[key]["ratio"]["iqr"], "<= 1.03"))
    if "sensitivity" in r:
        s = r["sensitivity"]
        for key, label in (("gradient", "gradient"), ("hutchinson", "Hutchinson trace"),
                           ("fisher", "Fisher / Gauss-Newton trace"), ("covariance", "data covariance")):
            rows.append((f"{label}, % of default run ({s['default_run_seconds']:.0f} s)", s[key]["percent_of_run"],
                         100 * s[key]["iqr"] / s["default_run_seconds"], "<= 3"))
        g = s["growth"]
        rows.append((f"hessian_online's {g['events']} growth events, % of default run", g["percent_of_run"], None, ""))
    if "allocation" in r:
        for n in (100, 1000):
            slowest = max((k for k in r["allocation"] if k.endswith(f"_{n}")),
                          key=lambda k: r["allocation"][k]["median"])
            x = r["allocation"][slowest]
            rows.append((f"allocation s, {n} layers (slowest: {slowest.rsplit('_', 1)[0]})", x["median"], x["iqr"],
                         "< 1"))
    if "full_ft" in r:
        f = r["full_ft"]
        for name, label in (("galore", "GaLore r=4"), ("adarankgrad", "AdaRankGrad")):
            rows.append((f"full-FT step: {label} / AdamW", f[name]["step_ratio_vs_adamw"], None, ""))
        for name, label in (("adamw", "AdamW"), ("galore", "GaLore r=4"), ("adarankgrad", "AdaRankGrad")):
            rows.append((f"optimizer state MiB: {label}", f[name]["state_bytes"] / 2**20, None, ""))
        rows.append(("AdaRankGrad average effective rank", f["adarankgrad"]["average_effective_rank"], None, ""))
    if "step_speed" in r:
        x = r["step_speed"]
        for name, v in x["variants"].items():
            rows.append((f"MiniLM step speed-up over before: {name}", v["speedup_vs_first"]["median"],
                         v["speedup_vs_first"]["iqr"], ">= 2" if name == DEFAULT_VARIANT else ""))
        for name, v in x["variants"].items():
            rows.append((f"step FLOP rate / its precision's matmul rate: {name}", v["fraction_of_reference"]["median"],
                         v["fraction_of_reference"]["iqr"], ""))
        for name, prof in x["profile"].items():
            rows.append((f"{name}: % matmul / rng / optimizer / other",
                         prof["percent"]["matmul"], None, " / ".join(f"{prof['percent'][k]:.0f}" for k in
                                                                    ("matmul", "rng", "optimizer", "other"))))
    if "nonuniform_step" in r:
        x = r["nonuniform_step"]
        for precision in ("no", "bf16"):
            if precision in x:
                rows.append((f"MiniLM step, ranks 1-14 / uniform r4 at equal parameters ({precision})",
                             x[precision]["ratio"]["median"], x[precision]["ratio"]["iqr"], "<= 1.05"))
    if "real_bases" in r:
        for base, v in r["real_bases"].items():
            for label in [k for k in v if k not in ("ratio", "tokens") and isinstance(v[k], dict)]:
                rows.append((f"step s, {base}, {label}", v[label]["median"], v[label]["iqr"], ""))
            if "ratio" in v:
                rows.append((f"step, {base}: responses' / every position's logits", v["ratio"]["median"],
                             v["ratio"]["iqr"], ""))
    if "compile" in r:
        for family, v in r["compile"].items():
            rows.append((f"compiled / eager step, {family}", v["ratio"]["median"], v["ratio"]["iqr"], ""))
            rows.append((f"compile s, {family} (a {TYPICAL_RUN_STEPS}-step run: x{v['typical_run_ratio']:.2f})",
                         v["compile_seconds"], None, ""))
    if "sweep" in r:
        x = r["sweep"]
        for name in ("now_sequential", "now_side_by_side"):
            rows.append((f"table1_cpu one seed, cells/hour {name} / before", x[name]["ratio_vs_before"], None,
                         ">= 1.5" if name == "now_side_by_side" else ""))
    if "offline_default" in r:
        x = r["offline_default"]
        seconds = f"{x['now']['seconds']:.0f} s / {x['before']['seconds']:.0f} s"
        rows.append((f"offline default wall, now / before ({seconds})", x["ratio"], None, "<= 0.5"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8, help="rounds of interleaved timing")
    parser.add_argument("--steps", type=int, default=5, help="batches per round")
    parser.add_argument("--sensitivity-repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--json", help="also write the JSON to this file")
    args = parser.parse_args()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # no load reports between the figures
    parts = args.only.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part {unknown[0]}; choose from {', '.join(PARTS)}")

    result = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "max_length": 64, "repeats": args.repeats, "steps_per_round": args.steps}
    for part in parts:
        start = time.perf_counter()
        result[part] = PARTS[part](args)
        print(f"# {part}: {time.perf_counter() - start:.0f} s", flush=True)
        if args.json:  # after every part: a later part that fails loses only itself
            write_json(args.json, result)

    print(f"{'measure':58} {'median':>10} {'IQR':>8}  goal")
    for name, value, iqr, goal in table_rows(result):
        print(f"{name:58} {value:10.3f} {'' if iqr is None else f'{iqr:8.3f}':>8}  {goal}")
    print(json.dumps(result, default=float))
    if args.json:
        write_json(args.json, result)


def write_json(path: str, result: dict) -> None:
    from lorambo.results import write_text_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(result, default=float) + "\n")


if __name__ == "__main__":
    main()
