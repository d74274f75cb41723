"""The one training entry point: build, allocate ranks, wrap, train, evaluate, save. Read top to bottom."""

import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lorambo import checkpoint
from lorambo.adapters import (ADAPTER, adalora_effective_ranks, adapter_parameter_count, adapter_ranks,
                              expected_parameter_count, lora_layers, wrap_adalora, wrap_lora)
from lorambo.allocators import allocate, required_stats
from lorambo.allocators.greedy import left_out
from lorambo.allocators.uniform import uniform_rank
from lorambo.ard_lora import ArdLora, ard_rank, head_groups, true_parameter_count
from lorambo.budget import budget_label, resolve_p_max
from lorambo.data import load_task
from lorambo.errors import LoramboError
from lorambo.growth import OnlineGrowth, grow_rank, sync_peft_config
from lorambo.metrics import perplexity, task_metrics
from lorambo.models import (adaptable_layers, build_model, build_tokenizer, check_model_fits_task,
                            head_parameters)
from lorambo.plots import plot_rank_history, plot_ranks
from lorambo.results import optimizer_state_bytes, peak_memory_bytes, reset_peak_memory, write_json_atomic
from lorambo.sensitivity import estimate, warmed_up_head
from lorambo.sensitivity import summary as sensitivity_summary


def set_train_mode(model, adapter_only: bool) -> None:
    """Training mode; with an adapter, batch-norm layers keep their base statistics (eval mode): running
    stats are buffers of the base model that the adapter file does not hold, so updating them would make the
    saved adapter not reproduce the trained model (and only adapter parameters are meant to change)."""
    model.train()
    if adapter_only:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def forward(model, batch, task_type):
    """(mean loss, logits) for any family: timm models return logits, Hugging Face models an output."""
    if task_type == "image_classification":
        logits = model(batch["pixel_values"])
        return F.cross_entropy(logits, batch["labels"]), logits
    out = model(**batch)
    return out.loss, out.logits


@torch.no_grad()
def evaluate(model, loader, task_cfg, accelerator) -> dict[str, float]:
    model.eval()
    gathered, labels = [], []
    for batch in loader:
        loss, logits = forward(model, batch, task_cfg.type)
        if task_cfg.type == "lm":
            # per-block mean token loss; blocks have equal length, so their mean is the token mean
            shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            per_block = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none").mean(1)
            gathered.append(accelerator.gather_for_metrics(per_block).cpu())
        else:
            logits, batch_labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
            gathered.append(logits.cpu())
            labels.append(batch_labels.cpu())
    if task_cfg.type == "lm":
        losses = torch.cat(gathered)
        return perplexity(float(losses.sum()), len(losses))
    return task_metrics(task_cfg.metrics, torch.cat(gathered).numpy(), torch.cat(labels).numpy())


def evaluate_all(model, eval_loaders, task_cfg, accelerator) -> dict[str, float]:
    """One split: plain metric names; several (MNLI): `accuracy_matched`, `accuracy_mismatched`."""
    results = {}
    for split, loader in eval_loaders.items():
        for key, value in evaluate(model, loader, task_cfg, accelerator).items():
            results[key if len(eval_loaders) == 1 else f"{key}_{split}"] = value
    return results


def train_step(model, batch, optimizer, scheduler, accelerator, trainable, cfg, after_optimizer_step=None, step=0,
               regularizer=None):
    """One micro-batch: forward, backward, and (when gradients are in sync) clip, step and zero.
    `after_optimizer_step(model, step)` runs between the optimizer step and zero_grad (AdaLoRA's budget update);
    `regularizer()` is added to the loss (ARD-LoRA's)."""
    with accelerator.accumulate(model):
        loss, _ = forward(model, batch, cfg.task.type)
        if regularizer is not None:
            loss = loss + regularizer()
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.train.max_grad_norm:
            accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        if after_optimizer_step is not None and accelerator.sync_gradients:
            after_optimizer_step(model, step)
        optimizer.zero_grad(set_to_none=True)
    return loss


def adalora_update(model, step: int) -> None:
    from accelerate.utils import extract_model_from_parallel

    extract_model_from_parallel(model).base_model.update_and_allocate(step)


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def run(cfg, run_dir: str) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from transformers import get_linear_schedule_with_warmup

    t_start = time.perf_counter()
    check_model_fits_task(cfg.model, cfg.task)
    logger = cfg.logger.name
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if logger == "none" else "wandb",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # several processes without GPUs (torchrun on CPUs): accelerate runs them data-parallel on gloo only
        # when told they are CPU processes; otherwise each would train alone
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
    )
    set_seed(cfg.seed)
    reset_peak_memory(accelerator.device)
    resumed, resumed_rng = checkpoint.load(run_dir, accelerator.process_index) if cfg.get("resume") else (None, None)

    # --- data, base model, layers, ranks, adapter
    tokenizer = build_tokenizer(cfg.model)
    data = load_task(cfg.task, cfg.model, tokenizer)
    model = build_model(cfg.model, cfg.task, tokenizer)
    if not cfg.model.pretrained and not cfg.model.get("pretrain") and accelerator.is_main_process:
        save_base_model(model, cfg.model, run_dir)  # a config-built base is random: keep it for reloading
    layers = adaptable_layers(model, cfg.model.target_modules)
    head = head_parameters(model, cfg.model.head_modules)
    batches_per_epoch = len(data.train) // cfg.train.batch_size // accelerator.num_processes
    if batches_per_epoch == 0:
        raise LoramboError(f"training split has {len(data.train)} examples, fewer than one batch per process; "
                           f"lower train.batch_size (now {cfg.train.batch_size})")
    steps = cfg.train.max_steps or max(1, cfg.train.epochs * batches_per_epoch // cfg.train.grad_accum)
    full_ft = cfg.allocator.adapter == "none"
    adalora = cfg.allocator.adapter == "adalora"
    stats, sensitivity_seconds, growth, ard = {}, 0.0, None, None
    if full_ft:
        p_max, ranks = None, {}
        for p in model.parameters():
            p.requires_grad_(True)
    elif adalora:  # PEFT's own allocator: starts above the budget and prunes to it during training
        p_max = resolve_p_max(cfg.budget, layers)
        model = wrap_adalora(model, layers, p_max, cfg.model.head_modules, cfg.lora, cfg.allocator, steps)
    elif cfg.allocator.adapter == "ard_lora":  # learnable rank scales over a rank-R adapter, cut at the end
        p_max = resolve_p_max(cfg.budget, layers)
        r0 = allocate("uniform", layers, p_max)[layers[0].name]
        rank = ard_rank(r0, layers, cfg.allocator.alpha_max)
        model = wrap_lora(model, {l.name: rank for l in layers}, cfg.model.head_modules, cfg.lora,
                          uniform_rank=r0)
        groups = head_groups(model.get_base_model(), layers, cfg.model.get("per_head_modules")
                             if cfg.allocator.per_head else None)
        ard = ArdLora(model, layers, groups, r0, p_max, cfg.allocator)
    else:
        p_max = resolve_p_max(cfg.budget, layers)
        if resumed is None:
            ranks, stats, sensitivity_seconds = allocate_ranks(cfg, model, layers, p_max, data, accelerator, run_dir)
        else:  # the allocation the run started with; growth since then is restored below
            ranks, stats, sensitivity_seconds = (resumed["initial_ranks"], resumed["stats"],
                                                 resumed["sensitivity_seconds"])
        use_dora = bool(cfg.allocator.get("dora", False))
        model = wrap_lora(model, ranks, cfg.model.head_modules, cfg.lora, use_dora, uniform_rank(layers, p_max))
        if adapter_parameter_count(model) != expected_parameter_count(ranks, layers, use_dora):
            raise RuntimeError("adapter tensors do not hold sum r_i c_i parameters")
        if accelerator.is_main_process and resumed is None:
            write_json_atomic(os.path.join(run_dir, "allocation.json"), {
                "allocator": cfg.allocator.name, "p_max": p_max, "ranks": ranks,
                "statistics": sorted(required_stats(cfg.allocator.name, **allocator_options(cfg.allocator)))
                if not cfg.allocator.get("from_run") else [], "from_run": cfg.allocator.get("from_run"),
                "lora_scaling": cfg.lora.scaling, **left_out(layers, p_max, ranks),
                "sensitivity": {name: {layer: {"mean": stats[f"{name}_raw"][layer], **bars}
                                       for layer, bars in per_layer.items()}
                                for name, per_layer in stats.get("errors", {}).items()}})
        if cfg.allocator.name == "hessian_online" and not cfg.allocator.get("from_run"):
            # the raw, unfloored traces: growth divides by them and handles unusable ones itself
            growth = OnlineGrowth(layers, p_max, stats[f"{cfg.allocator.curvature}_raw"], cfg.allocator, run_dir,
                                  steps)
            if accelerator.is_main_process and resumed is None:
                growth.record(0, ranks)
    initial_ranks = {} if full_ft or adalora or ard else ranks
    if resumed is not None:
        restore_training_tensors(model, layers, resumed, growth, ard, adalora, full_ft)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # --- optimisation
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(data.train, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                              collate_fn=data.collate_fn, generator=generator)
    eval_loaders = {name: DataLoader(ds, batch_size=cfg.train.eval_batch_size, collate_fn=data.collate_fn)
                    for name, ds in data.evals.items()}
    optimizer = build_optimizer(cfg, model, layers, trainable, full_ft)
    if ard is not None:  # the rank scales learn at their own rate, without weight decay
        optimizer.add_param_group({"params": ard.parameters(), "lr": cfg.allocator.alpha_lr, "weight_decay": 0.0})
    projection_ranks = ProjectionRanks(optimizer, model, layers, run_dir) if cfg.optimizer.name != "adamw" else None
    # accelerate steps a prepared scheduler once per process at each optimizer step (it assumes a schedule
    # written for one process), so the schedule is laid out in those units, as Hugging Face's own scripts do
    n = accelerator.num_processes
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * steps) * n, steps * n)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in eval_loaders.items()}
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if logger != "none":
        accelerator.init_trackers(cfg.logger.project, config=resolved, init_kwargs={"wandb": {
            "mode": cfg.logger.mode, "dir": run_dir, "name": os.path.basename(run_dir)}})
    log_path = os.path.join(run_dir, "metrics_log.jsonl")

    def log(record: dict, step: int) -> None:
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")
        accelerator.log(record, step=step)

    # --- training loop
    step, epoch, step_times, interval_loss, interval_batches = 0, 0, [], 0.0, 0
    batch_in_epoch, train_seconds_before = 0, 0.0
    if resumed is not None:
        step, epoch, batch_in_epoch = resumed["step"], resumed["epoch"], resumed["batch_in_epoch"]
        step_times, train_seconds_before = resumed["step_times"], resumed["train_seconds"]
        interval_loss, interval_batches = resumed["interval"]
        if projection_ranks is not None:
            projection_ranks.sums, projection_ranks.count = resumed["projection_ranks"]
        if accelerator.is_main_process:  # what a killed run logged after its checkpoint is logged again
            for name in ("metrics_log.jsonl", "rank_history.jsonl"):
                checkpoint.truncate_jsonl(os.path.join(run_dir, name), step)
        checkpoint.restore_rng(resumed_rng)
    checkpoint_every = cfg.train.get("checkpoint_every") or 0
    t_train = time.perf_counter()
    t_interval = t_train
    # a context manager, so the bar is closed before any error line is printed
    with tqdm(total=steps, initial=step, desc="train", disable=not accelerator.is_main_process,
              dynamic_ncols=True) as progress:
        set_train_mode(model, not full_ft)
        while step < steps:
            train_loader.set_epoch(epoch)
            # a resumed run continues mid-epoch: the same shuffled order, without the batches already seen
            loader = accelerator.skip_first_batches(train_loader, batch_in_epoch) if batch_in_epoch else train_loader
            for batch in loader:
                batch_in_epoch += 1
                t_step = time.perf_counter()
                measuring = growth is not None and accelerator.sync_gradients and growth.due(step + 1)
                with growth.measuring(accelerator.unwrap_model(model)) if measuring else nullcontext():
                    loss = train_step(model, batch, optimizer, scheduler, accelerator, trainable, cfg,
                                      after_optimizer_step=adalora_update if adalora else None, step=step + 1,
                                      regularizer=ard.regularizer if ard is not None else None)
                if measuring and growth.grow(step + 1, accelerator.unwrap_model(model), optimizer, accelerator):
                    trainable = [p for p in model.parameters() if p.requires_grad]
                    accelerator.log({f"rank/{n}": r for n, r in adapter_ranks(accelerator.unwrap_model(model)).items()},
                                    step=step + 1)
                    if accelerator.num_processes > 1:  # DDP's buckets hold the old tensors: wrap anew
                        model = accelerator.prepare_model(accelerator.unwrap_model(model))
                interval_loss = interval_loss + loss.detach()  # stays on device: no host sync per step
                interval_batches += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                step_times.append(time.perf_counter() - t_step)
                if projection_ranks is not None:
                    projection_ranks.update(step, record=step % cfg.train.log_every == 0 or step == steps)
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == steps:
                    # every process's share (all reach this line at the same step): the run's loss, and a
                    # non-finite loss stops every process rather than leaving the others waiting
                    mean_loss = float(accelerator.reduce(interval_loss, reduction="mean")) / interval_batches
                    if not math.isfinite(mean_loss):
                        raise LoramboError(f"loss became {mean_loss} by step {step}; lower train.lr "
                                           f"(now {cfg.train.lr:g}) or set train.mixed_precision=no")
                    elapsed = time.perf_counter() - t_interval
                    rate = interval_batches * cfg.train.batch_size * accelerator.num_processes / elapsed
                    progress.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{rate:.1f}")
                    log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0],
                         "train/samples_per_second": rate}, step)
                    interval_loss, interval_batches, t_interval = 0.0, 0, time.perf_counter()
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps:
                    log({f"eval/{k}": v for k, v in evaluate_all(model, eval_loaders, cfg.task, accelerator).items()},
                        step)
                    set_train_mode(model, not full_ft)
                if checkpoint_every and step % checkpoint_every == 0 and step < steps:
                    unwrapped = accelerator.unwrap_model(model)
                    checkpoint.save(run_dir, {
                        "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                        "initial_ranks": initial_ranks, "sensitivity_seconds": sensitivity_seconds,
                        # growth's curvature traces (raw: growth divides by them), for a resumed run's events
                        "stats": {k: v for k, v in stats.items() if k.endswith("_raw")} if growth else {},
                        "tensors": training_tensors(unwrapped, full_ft, ard, adalora, growth),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "step_times": step_times, "interval": (float(interval_loss), interval_batches),
                        "train_seconds": train_seconds_before + time.perf_counter() - t_train,
                        "projection_ranks": (projection_ranks.sums, projection_ranks.count)
                        if projection_ranks is not None else None,
                    }, resolved, accelerator)
                if step >= steps:
                    break
            if step < steps:
                epoch, batch_in_epoch = epoch + 1, 0
    train_seconds = train_seconds_before + time.perf_counter() - t_train

    # --- evaluation, counts, saving
    if ard is not None:
        ard.finalize()  # integer ranks at the budget; what is evaluated and saved is the cut adapter
    t_eval = time.perf_counter()
    results = evaluate_all(model, eval_loaders, cfg.task, accelerator)
    eval_seconds = time.perf_counter() - t_eval
    unwrapped = accelerator.unwrap_model(model)
    if adalora:  # AdaLoRA masks rather than shrinks: count what its final rank pattern keeps
        final_ranks = {n: r for n, r in adalora_effective_ranks(unwrapped).items() if r > 0}
        cost = {l.name: l.cost + 1 for l in layers}  # A row, B column and one singular value per rank
        adapter_params = sum(r * cost[n] for n, r in final_ranks.items())
    elif ard is not None:
        final_ranks = adapter_ranks(unwrapped)
        adapter_params = true_parameter_count(ard.final_ranks, {l.name: l for l in layers})
    else:
        final_ranks = {} if full_ft else adapter_ranks(unwrapped)
        adapter_params = 0 if full_ft else adapter_parameter_count(unwrapped)
    element_size = next(p for p in trainable).element_size()
    metrics = {
        **results,
        "model": cfg.model.name, "task": cfg.task.name, "allocator": cfg.allocator.name, "seed": cfg.seed,
        "optimizer": cfg.optimizer.name, "optimizer_rank": cfg.optimizer.get("rank"),
        "budget": None if full_ft else budget_label(cfg.budget), "p_max": p_max,
        "main_metric": cfg.task.main_metric, "reported_metrics": reported_metrics(cfg.task, list(eval_loaders)),
        "adapter_params": adapter_params,
        "adapter_bytes": adapter_params * element_size,
        "adapter_mib": adapter_params * element_size / 2**20,
        "head_params": sum(p.numel() for p in head),
        "trainable_params": sum(p.numel() for p in trainable),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "peak_memory_bytes": peak_memory_bytes(accelerator.device),
        "train_seconds": train_seconds,
        "sensitivity_seconds": sensitivity_seconds,
        "eval_seconds": eval_seconds,
        "step_seconds_median": statistics.median(step_times),
        "steps": step,
        "resumed_from_step": resumed["step"] if resumed is not None else None,
        "lr": cfg.train.lr,
        "lora_scaling": None if full_ft or adalora else cfg.lora.scaling,  # the update scale policy
        "ranks": final_ranks,
    }
    if growth is not None:
        metrics.update(growth.outcome(final_ranks))
        # the last event spends what positive benefits can take; budget is left only if the run ended first
        if growth.events_left and metrics["growth_unspent_params"] >= min(l.cost for l in layers):
            warning = (f"hessian_online left {metrics['growth_unspent_params']:,} of P_max={p_max:,} unspent "
                       f"({metrics['growth_ended']}); set allocator.grow_every or train longer")
            metrics["warning"] = warning
            if accelerator.is_main_process:
                print(f"lorambo-run: warning: {warning}", file=sys.stderr)
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "warning": warning}) + "\n")
    if ard is not None:
        metrics["head_ranks"] = {n: r for n, r in ard.final_ranks.items() if len(r) > 1}
        metrics["adapter_params_peft_form"] = adapter_parameter_count(unwrapped)
    if projection_ranks is not None:  # paper 003's effective rank: each layer's projection rank averaged over steps
        metrics["projection_ranks"] = projection_ranks.time_averaged()
        metrics["effective_rank"] = statistics.mean(metrics["projection_ranks"].values())
    if accelerator.is_main_process:
        if not full_ft:
            if not adalora:
                sync_peft_config(unwrapped)  # online growth changed ranks: the saved config must say so
            plot_ranks(metrics["ranks"], [l.name for l in layers], os.path.join(run_dir, "ranks.png"),
                       f"{cfg.allocator.name}: {metrics['adapter_params']:,} adapter parameters")
        if projection_ranks is not None:
            with open(projection_ranks.history_path) as f:
                history = [json.loads(line) for line in f]
            plot_rank_history(history, [l.name for l in layers], os.path.join(run_dir, "rank_history.png"),
                              f"{cfg.optimizer.name}: projection rank of every layer over training")
        if growth is not None:
            growth.record(step, metrics["ranks"])
            with open(growth.history_path) as f:
                history = [json.loads(line) for line in f]
            plot_rank_history(history, [l.name for l in layers], os.path.join(run_dir, "rank_history.png"),
                              "hessian_online: rank of every layer over training")
        save_trained(unwrapped, full_ft, run_dir)
        with open(os.path.join(run_dir, "config_resolved.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(resolved))
        metrics["total_seconds"] = time.perf_counter() - t_start
        log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}, step)
        accelerator.log({f"rank/{name}": r for name, r in metrics["ranks"].items()}, step=step)
        write_json_atomic(os.path.join(run_dir, "metrics.json"), metrics)  # last: its presence means complete
    accelerator.wait_for_everyone()
    if checkpoint_every and not cfg.train.get("keep_checkpoint") and accelerator.is_main_process:
        checkpoint.remove(run_dir)  # the run is complete: metrics, adapter and logs hold everything
    accelerator.end_training()
    return metrics


def training_tensors(model, full_ft: bool, ard, adalora: bool, growth) -> dict:
    """What a checkpoint holds of the model and the method: trainable tensors (full FT: the whole state, with
    buffers), the LoRA ranks they have, ARD-LoRA's scales, AdaLoRA's importance scores, growth's progress."""
    tensors = {"model": {n: t.detach().cpu().clone() for n, t in model.state_dict().items()} if full_ft else
               {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}}
    if not full_ft and not adalora:  # AdaLoRA masks instead: its tensors keep their shapes
        tensors["ranks"] = adapter_ranks(model)
    if ard is not None:
        tensors["ard"] = [p.detach().cpu().clone() for p in ard.parameters()]
    if adalora:
        allocator = model.base_model.rankallocator
        tensors["adalora"] = {k: getattr(allocator, k) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
        tensors["adalora_rank_pattern"] = model.peft_config[ADAPTER].rank_pattern
    if growth is not None:
        tensors["growth"] = growth.state()
    return tensors


def restore_training_tensors(model, layers, resumed, growth, ard, adalora: bool, full_ft: bool) -> None:
    """Put a checkpoint's tensors back into a freshly built model: LoRA layers first grown to the ranks they
    had (growth keeps each layer's scale from its starting rank, so they are wrapped at that and grown)."""
    tensors = resumed["tensors"]
    if not full_ft and not adalora:
        specs = {l.name: l for l in layers}
        for name, layer in lora_layers(model).items():
            extra = tensors["ranks"][name] - int(layer.r[ADAPTER])
            if extra > 0:
                grow_rank(layer, torch.zeros(extra, specs[name].d_in), None)
    missing, unexpected = model.load_state_dict(tensors["model"], strict=False)
    if unexpected or (full_ft and missing):
        raise LoramboError(f"checkpoint does not fit this model ({(unexpected or missing)[0]}, ...); "
                           f"resume a run with its own config")
    if ard is not None:
        with torch.no_grad():
            for p, value in zip(ard.parameters(), tensors["ard"]):
                p.copy_(value)
    if adalora:
        allocator = model.base_model.rankallocator
        for k, v in tensors["adalora"].items():
            setattr(allocator, k, v)
        model.peft_config[ADAPTER].rank_pattern = tensors["adalora_rank_pattern"]
    if growth is not None:
        growth.load_state(tensors["growth"])


def reported_metrics(task_cfg, splits: list[str]) -> list[str]:
    """The metrics a table shows for this task: the main one, for every evaluation split (MNLI: m and mm)."""
    main = task_cfg.main_metric
    if len(splits) == 1:
        return [main]
    base = next((main[: -len(s) - 1] for s in splits if main.endswith("_" + s)), main)
    return [f"{base}_{s}" for s in splits]


def build_optimizer(cfg, model, layers, trainable, full_ft: bool):
    """AdamW, or GaLore / AdaRankGrad for full-parameter training: the adaptable layers' weights get low-rank
    gradient projection, every other trainable parameter plain AdamW."""
    name, lr, wd = cfg.optimizer.name, cfg.train.lr, cfg.train.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=wd)
    if not full_ft:
        raise LoramboError(f"optimizer={name} trains all weights with low-rank gradients; use allocator=full_ft "
                           f"(or optimizer=adamw with a LoRA allocator)")
    from lorambo.optimizers import AdaRankGrad, GaLore

    matrices = {id(model.get_submodule(l.name).weight) for l in layers}
    groups = [{"params": [p for p in trainable if id(p) in matrices], "low_rank": True},
              {"params": [p for p in trainable if id(p) not in matrices]}]
    options = {k: v for k, v in OmegaConf.to_container(cfg.optimizer, resolve=True).items() if k != "name"}
    cls = {"galore": GaLore, "adarankgrad": AdaRankGrad}[name]
    return cls(groups, lr=lr, weight_decay=wd, **options)


class ProjectionRanks:
    """The rank of every layer's gradient projection over training: summed every step (for the time
    average), written to rank_history.jsonl at log steps."""

    def __init__(self, optimizer, model, layers, run_dir):
        self.optimizer = optimizer
        self.names = {id(model.get_submodule(l.name).weight): l.name for l in layers}
        self.sums, self.count = {}, 0
        self.history_path = os.path.join(run_dir, "rank_history.jsonl")

    def update(self, step: int, record: bool) -> None:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        ranks = {self.names[i]: r for i, r in inner.projection_ranks().items() if i in self.names}
        for name, r in ranks.items():
            self.sums[name] = self.sums.get(name, 0) + r
        self.count += 1
        if record:
            with open(self.history_path, "a") as f:
                f.write(json.dumps({"step": step, "ranks": ranks}) + "\n")

    def time_averaged(self) -> dict[str, float]:
        return {name: total / self.count for name, total in self.sums.items()}


def allocate_ranks(cfg, model, layers, p_max, data, accelerator, run_dir) -> tuple[dict, dict, float]:
    """Ranks from the allocator (after measuring the statistics it needs on the base model), or reused from
    another run; returns (ranks, statistics, seconds spent estimating)."""
    options = allocator_options(cfg.allocator)
    if cfg.allocator.get("from_run"):
        return ranks_from_run(cfg.allocator.from_run, layers, p_max), {}, 0.0
    stats, seconds = {}, 0.0
    required = required_stats(cfg.allocator.name, **options)
    if required:
        start = time.perf_counter()
        batches = estimation_batches(data, cfg, accelerator.device, accelerator.num_processes)
        model = model.to(accelerator.device)
        output_fn = lambda m, b: forward(m, b, cfg.task.type)
        # a random head is not the model being adapted: optionally fit it alone first; the trained run
        # starts from the untouched head all the same (every allocator trains from the same start)
        with warmed_up_head(model, head_parameters(model, cfg.model.head_modules), batches, output_fn,
                            cfg.sensitivity.head_warmup_steps, cfg.sensitivity.head_warmup_lr):
            stats = estimate(required, model, layers, batches, output_fn, cfg.sensitivity, cfg.seed,
                             cfg.task.type)
        seconds = time.perf_counter() - start
        if accelerator.is_main_process:
            write_json_atomic(os.path.join(run_dir, "sensitivities.json"), sensitivity_summary(stats))
    return allocate(cfg.allocator.name, layers, p_max, stats, **options), stats, seconds


def allocator_options(allocator_cfg) -> dict:
    """The allocator's own settings, as keyword arguments of its allocation function."""
    return {k: v for k, v in OmegaConf.to_container(allocator_cfg, resolve=True).items()
            if k not in ("name", "adapter", "lr", "from_run")}


def ranks_from_run(path: str, layers, p_max: int) -> dict[str, int]:
    """Reuse another run's allocation (its allocation.json, or the final ranks in metrics.json)."""
    for file in ("metrics.json", "allocation.json"):
        if os.path.exists(os.path.join(path, file)):
            with open(os.path.join(path, file)) as f:
                ranks = json.load(f)["ranks"]
            break
    else:
        raise LoramboError(f"allocator.from_run='{path}' has no allocation.json or metrics.json; "
                           f"point it at a run folder")
    known = {l.name: l for l in layers}
    unknown = sorted(set(ranks) - set(known))
    if unknown:
        raise LoramboError(f"allocator.from_run ranks name layers this model does not have ({unknown[0]}, ...); "
                           f"reuse a run of the same model")
    cost = sum(r * known[n].cost for n, r in ranks.items())
    if cost > p_max:
        raise LoramboError(f"allocator.from_run allocation costs {cost:,} > P_max={p_max:,}; use that run's budget")
    return ranks


def estimation_batches(data, cfg, device, num_processes: int = 1) -> list[dict]:
    """The first batches of a separately seeded shuffle of the training split, for sensitivity estimation.
    Batches of the global batch size, the same in every process: N processes allocate as one process would."""
    s = cfg.sensitivity
    n = max(s.gradient_batches, s.hessian_batches, s.covariance_batches, s.fisher_batches, s.head_warmup_steps)
    loader = DataLoader(data.train, batch_size=cfg.train.batch_size * num_processes, shuffle=True,
                        collate_fn=data.collate_fn,
                        generator=torch.Generator().manual_seed(cfg.seed + 1))
    return [{k: v.to(device) for k, v in batch.items()} for _, batch in zip(range(n), loader)]


def save_base_model(model, model_cfg, run_dir: str) -> None:
    path = os.path.join(run_dir, "base_model")
    if model_cfg.family == "vision":
        os.makedirs(path, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(path, "model.pt"))
    else:
        model.save_pretrained(path)


def save_trained(model, full_ft: bool, run_dir: str) -> None:
    """The adapter in PEFT's format (`PeftModel.from_pretrained(base, run_dir/adapter)`), or for full
    fine-tuning the whole model."""
    if not full_ft:
        model.save_pretrained(os.path.join(run_dir, "adapter"))
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(os.path.join(run_dir, "model"))
    else:
        os.makedirs(os.path.join(run_dir, "model"), exist_ok=True)
        torch.save(model.state_dict(), os.path.join(run_dir, "model", "model.pt"))
