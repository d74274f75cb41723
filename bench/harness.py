"""lorambo's benchmark harness (`make bench`): what choosing an allocator costs beyond a plain LoRA run.

Everything is measured in this one process, on this machine. Things compared with each other are timed
interleaved (blocks of steps over the same batches, in alternating order), and every figure is a median over
repeats after warm-up, with its interquartile range (IQR). Prints a table of ratios and percentages, then the
same as JSON on the last line (and to --json FILE if given).

    .venv/bin/python bench/harness.py [--repeats 8] [--steps 5] [--only minilm_vs_peft,...] [--json FILE]

Parts (--only): minilm_vs_peft, tiny_gpt2_vs_peft, grown_vs_direct, sensitivity, allocation, full_ft,
flop_rate.
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


def interleaved(steppers: dict, batches, repeats: int, samples_out: dict | None = None) -> dict:
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
    out = {name: spread(times) for name, times in samples.items()}
    if len(names) == 2:
        a, b = (rounds[n] for n in names)
        out["ratio"] = spread([statistics.median(x) / statistics.median(y) for x, y in zip(a, b)])
    return out


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


def plain_stepper(model, lr: float = 1e-4):
    """A plain loop over a PEFT model: AdamW on its trainable parameters with a linear schedule."""
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    return adamw_step(model, optimizer, lambda: trainable,
                      scheduler=get_linear_schedule_with_warmup(optimizer, 0, 10**6))


def lorambo_stepper(model, cfg):
    """lorambo's own training step: its model wrapper, accelerate, and train.train_step."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10**6)
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
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
    times = interleaved({"lorambo": lorambo_stepper(ours, cfg), "peft": plain_stepper(plain)}, batches,
                        args.repeats)
    return {**times, "rank": max(ranks.values()), "layers": len(ranks)}


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


def lora_flop_rate(args) -> dict:
    """A LoRA step's arithmetic rate (FLOP counted from the shapes) as a fraction of the rate of a large
    float32 matmul measured in the same run."""
    cfg, model, batches = setting(["budget=r8"], args.batch_size, args.steps)
    layers = adaptable_layers(model, cfg.model.target_modules)
    ranks = allocate("uniform", layers, resolve_p_max(cfg.budget, layers))
    lora = wrap_lora(model, ranks, cfg.model.head_modules, cfg.lora)
    samples = {}
    step = interleaved({"lora": lorambo_stepper(lora, cfg)}, batches, args.repeats, samples)["lora"]
    flop = [encoder_step_flop(lora.base_model.model, b) for b in batches]
    rates = [f / t for f, t in zip(flop * args.repeats, samples["lora"])]
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    runs = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        runs.append(time.perf_counter() - start)
    matmul = spread(runs)
    matmul_rate = 2 * n**3 / matmul["median"]
    lora_rate = statistics.median(rates)
    return {"step": step, "flop_per_step_mean": statistics.mean(flop), "lora_flop_per_s": lora_rate,
            "lora_flop_per_s_iqr": spread(rates)["iqr"], "matmul_2048": matmul, "matmul_flop_per_s": matmul_rate,
            "fraction": lora_rate / matmul_rate}


PARTS = {
    "minilm_vs_peft": lambda args: lorambo_vs_peft(["budget=r8"], args),
    "tiny_gpt2_vs_peft": lambda args: lorambo_vs_peft(["model=tiny_gpt2", "task=wiki_summaries", "budget=r8"], args),
    "grown_vs_direct": grown_vs_direct,
    "sensitivity": sensitivity_share,
    "allocation": allocation_time,
    "full_ft": full_ft_optimizers,
    "flop_rate": lora_flop_rate,
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
    if "flop_rate" in r:
        x = r["flop_rate"]
        rows.append(("LoRA step FLOP rate / 2048^2 matmul rate", x["fraction"],
                     x["fraction"] * x["lora_flop_per_s_iqr"] / x["lora_flop_per_s"], ""))
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

    print(f"{'measure':58} {'median':>10} {'IQR':>8}  goal")
    for name, value, iqr, goal in table_rows(result):
        print(f"{name:58} {value:10.3f} {'' if iqr is None else f'{iqr:8.3f}':>8}  {goal}")
    text = json.dumps(result, default=float)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
