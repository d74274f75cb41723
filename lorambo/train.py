"""The one training entry point, read top to bottom: set up, allocate, wrap, loop, finish, write results.

Everything about a way of training lives in its method (lorambo/methods/), called at named hooks; everything
about choosing ranks in lorambo/allocation.py. This file has no method flags."""

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from lorambo import checkpoint
from lorambo.allocation import choose_ranks
from lorambo.budget import budget_label, resolve_p_max
from lorambo.data import data_loaders, start_epoch
from lorambo.devices import make_accelerator, prepare, unwrap
from lorambo.dropout import use_mask_dropout
from lorambo.errors import LoramboError
from lorambo.evaluation import evaluate_all, reported_metrics, training_loss
from lorambo.methods import build_method
from lorambo.models import (adaptable_layers, base_dtype, check_model_fits_task, head_parameters,
                            load_data_and_base, resolve_family, use_gradient_checkpointing)
from lorambo.optimizers import build_optimizer, build_scheduler
from lorambo.pretrain import base_sha256
from lorambo.results import (RunLog, append_jsonl, hub_revisions, library_versions, optimizer_state_bytes,
                             peak_memory_bytes, reset_peak_memory, source_revision, write_json_atomic,
                             write_text_atomic)
from lorambo.schema import check_config
from lorambo.stopping import RunStopped, stop_at_step_end, stop_requested


@dataclass
class Progress:
    """Where the loop is: what a checkpoint needs to continue it exactly."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    step_times: list = field(default_factory=list)
    interval_loss: float = 0.0  # summed micro-batch losses since the last log line (a tensor while training)
    interval_batches: int = 0
    train_seconds: float = 0.0  # in the loop (a resumed run: before this process started, until it ends)


def run(cfg, run_dir: str) -> dict:
    from accelerate.utils import set_seed

    t_start = time.perf_counter()
    check_config(cfg)
    resolve_family(cfg)
    check_model_fits_task(cfg.model, cfg.task)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    reset_peak_memory(accelerator.device)
    resumed, resumed_rng = checkpoint.load(run_dir, accelerator.process_index) if cfg.get("resume") else (None, None)
    main = accelerator.is_main_process

    # --- data, base model, layers, method, ranks, adapter
    data, model = load_data_and_base(cfg, run_dir, main, accelerator.device)
    layers = adaptable_layers(model, cfg.model.target_modules)
    head_params = sum(p.numel() for p in head_parameters(model, cfg.model.head_modules))
    steps = training_steps(cfg, len(data.train), accelerator.num_processes)
    method = build_method(cfg, layers, steps, run_dir, main)
    p_max = resolve_p_max(cfg.budget, layers) if method.trains_adapter else None
    allocation = resumed["allocation"] if resumed else choose_ranks(cfg, method, model, layers, p_max, data,
                                                                   accelerator, run_dir)
    model = method.wrap(model, p_max, allocation["ranks"], allocation["stats"])
    if cfg.train.get("gradient_checkpointing"):  # after the statistics: they take their gradients unchecked
        use_gradient_checkpointing(model)
    if cfg.train.get("dropout_masks") == "packed":
        use_mask_dropout(model)
    if resumed:
        method.load_state(model, resumed["method"])

    # --- optimisation
    train_loader, eval_loaders = data_loaders(cfg, data, accelerator.num_processes)
    optimizer = build_optimizer(cfg.optimizer, cfg.train, method.param_groups(model))
    scheduler = build_scheduler(cfg.train, optimizer, steps, accelerator.num_processes)
    model, optimizer, train_loader, scheduler = prepare(accelerator, model, optimizer, train_loader, scheduler)
    eval_loaders = {name: accelerator.prepare(loader) for name, loader in eval_loaders.items()}
    evaluate_now = lambda m: evaluate_all(m, eval_loaders, cfg.task, accelerator, data.evaluate)
    progress = Progress(**(checkpoint.continue_from(resumed, resumed_rng, optimizer, scheduler, run_dir, main)
                           if resumed else {}))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if cfg.logger.name != "none":
        accelerator.init_trackers(cfg.logger.project, config=resolved, init_kwargs={"wandb": {
            "mode": cfg.logger.mode, "dir": run_dir, "name": os.path.basename(run_dir)}})
    log = RunLog(accelerator, os.path.join(run_dir, "metrics_log.jsonl"))

    # --- training
    model = train(cfg, method, model, optimizer, scheduler, train_loader, evaluate_now, accelerator, log, progress,
                  steps, allocation, resolved, run_dir)

    # --- finish, evaluate, count, save
    unwrapped, trainable = unwrap(accelerator, model), [p for p in model.parameters() if p.requires_grad]
    outcome, t_eval = method.finish(unwrapped, progress.step), time.perf_counter()  # a method may cut its adapter
    results = evaluate_now(model)
    metrics = {  # metrics.json: the keys every report reads
        **results, **outcome,
        "model": cfg.model.name, "task": cfg.task.name, "allocator": method.label(), "method": method.name,
        "seed": cfg.seed, "optimizer": cfg.optimizer.name, "optimizer_rank": cfg.optimizer.get("rank"),
        "budget": budget_label(cfg.budget) if method.trains_adapter else None, "p_max": p_max,
        "main_metric": reported_metrics(cfg.task, list(eval_loaders))[0], "eval_splits": list(eval_loaders),
        "reported_metrics": reported_metrics(cfg.task, list(eval_loaders)),
        "adapter_bytes": (size := outcome["adapter_params"] * trainable[0].element_size()), "adapter_mib": size / 2**20,
        "head_params": head_params, "trainable_params": sum(p.numel() for p in trainable),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "peak_memory_bytes": peak_memory_bytes(accelerator.device),
        "train_seconds": progress.train_seconds, "sensitivity_seconds": allocation["seconds"],
        "eval_seconds": time.perf_counter() - t_eval,
        "step_seconds_median": statistics.median(progress.step_times), "steps": progress.step,
        "resumed_from_step": resumed["progress"]["step"] if resumed else None, "lr": cfg.train.lr,
        "mixed_precision": accelerator.mixed_precision, "threads": torch.get_num_threads(),
        **environment_record(cfg, method, unwrapped),
    }
    if main:
        write_results(method, metrics, unwrapped, log, resolved, run_dir, t_start, progress.step)
    accelerator.wait_for_everyone()
    if cfg.train.get("checkpoint_every") and not cfg.train.get("keep_checkpoint") and main:
        checkpoint.remove(run_dir)  # the run is complete: metrics, adapter and logs hold everything
    accelerator.end_training()
    return metrics


def environment_record(cfg, method, model) -> dict:
    """What the same numbers need besides the config: the base's dtype and quantisation, its file's sha256 (a
    base pretrained here), the numeric libraries' versions, the lorambo commit, and what the hub served."""
    return {"base_dtype": str(base_dtype(cfg.model, not method.trains_adapter)).removeprefix("torch."),
            "quantize": cfg.model.get("quantize"), "base_sha256": base_sha256(cfg.model),
            "versions": library_versions(), "source": source_revision(),
            "hub_revisions": hub_revisions(model, cfg.task)}


def write_results(method, metrics: dict, model, log, resolved: dict, run_dir: str, t_start: float, step: int):
    """The trained weights, the resolved config, the last log records, and metrics.json last: its presence
    means the run is complete."""
    if "warning" in metrics:
        print(f"lorambo-run: warning: {metrics['warning']}", file=sys.stderr)
        append_jsonl(log.path, {"step": step, "warning": metrics["warning"]})
    method.save(model, run_dir)
    write_text_atomic(os.path.join(run_dir, "config_resolved.yaml"), OmegaConf.to_yaml(resolved))
    metrics["total_seconds"] = time.perf_counter() - t_start
    log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}, step)
    log.accelerator.log({f"rank/{name}": r for name, r in metrics["ranks"].items()}, step=step)
    write_json_atomic(os.path.join(run_dir, "metrics.json"), metrics)


def train(cfg, method, model, optimizer, scheduler, train_loader, evaluate_now, accelerator, log, progress,
          steps, allocation, resolved, run_dir):
    """The loop: forward, backward, step, the method's hooks, log, evaluate, checkpoint. Returns the model
    (a method that replaces parameters under several processes needs it wrapped anew)."""
    checkpoint_every = cfg.train.get("checkpoint_every") or 0
    t_train = t_interval = time.perf_counter()
    p = progress
    trainable = [q for q in model.parameters() if q.requires_grad]  # clipped each step; new after growth
    # context managers: the bar closed before any error line; a SIGTERM kept for a step's end, a Ctrl-C's step said
    with tqdm(total=steps, initial=p.step, desc="train", disable=not accelerator.is_main_process,
              dynamic_ncols=True) as bar, stop_at_step_end(p, steps):
        method.train_mode(model)
        while p.step < steps:
            start_epoch(train_loader, p.epoch)
            # a resumed run continues mid-epoch: the same shuffled order, without the batches already seen
            loader = (accelerator.skip_first_batches(train_loader, p.batch_in_epoch) if p.batch_in_epoch
                      else train_loader)
            for batch in loader:
                p.batch_in_epoch += 1
                t_step = time.perf_counter()
                with method.measuring(p.step + 1, unwrap(accelerator, model)) as hooks:  # hooks: run uncompiled
                    loss = train_step(model if hooks is None else getattr(model, "_orig_mod", model), batch,
                                      optimizer, scheduler, accelerator, cfg, method, p.step + 1, trainable)
                p.interval_loss = p.interval_loss + loss.detach()  # stays on device: no host sync per step
                p.interval_batches += 1
                if not accelerator.sync_gradients:
                    continue
                p.step += 1
                if method.after_step(p.step, unwrap(accelerator, model), optimizer, accelerator):
                    trainable = [q for q in model.parameters() if q.requires_grad]
                    if accelerator.num_processes > 1:  # DDP's buckets hold the old tensors: wrap anew
                        model = prepare(accelerator, unwrap(accelerator, model))
                p.step_times.append(time.perf_counter() - t_step)
                bar.update(1)
                if p.step % cfg.train.log_every == 0 or p.step == steps:
                    t_interval = log_training(cfg, accelerator, log, bar, p, optimizer, scheduler, t_interval)
                if cfg.train.eval_every and p.step % cfg.train.eval_every == 0 and p.step < steps:
                    log({f"eval/{k}": v for k, v in evaluate_now(model).items()}, p.step)
                    method.train_mode(model)
                stop = stop_requested() if p.step < steps else None  # SIGTERM (preemption): checkpoint, stop
                if checkpoint_every and (p.step % checkpoint_every == 0 or stop) and p.step < steps:
                    state = {**asdict(p), "interval_loss": float(p.interval_loss),
                             "train_seconds": p.train_seconds + time.perf_counter() - t_train}
                    checkpoint.save(run_dir, {
                        "step": p.step, "progress": state, "method": method.state(unwrap(accelerator, model)),
                        "allocation": {**allocation, "stats": {k: v for k, v in allocation["stats"].items()
                                                               if k.endswith("_raw")}},
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                        resolved, accelerator)
                if stop:
                    raise RunStopped(stop, p.step, steps)
                if p.step >= steps:
                    break
            if p.step < steps:
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
    p.train_seconds += time.perf_counter() - t_train
    return model


def train_step(model, batch, optimizer, scheduler, accelerator, cfg, method, step: int, trainable):
    """One micro-batch: forward (plus the method's loss term), backward, and when gradients are in sync, clip,
    step, the method's after-optimizer-step hook (AdaLoRA's budget update), zero."""
    with accelerator.accumulate(model):
        with accelerator.autocast():  # train.mixed_precision: the forward only, as torch's AMP recipe has it
            loss = training_loss(model, batch, cfg.task.type)
            extra = method.loss_term()
            if extra is not None:
                loss = loss + extra
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.train.max_grad_norm:
            accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        if accelerator.sync_gradients:
            method.after_optimizer_step(model, step)
        optimizer.zero_grad(set_to_none=True)
    return loss


def log_training(cfg, accelerator, log, bar, p: Progress, optimizer, scheduler, t_interval: float) -> float:
    """Every process's share (all reach this line at the same step): the run's loss, and a non-finite loss
    stops every process rather than leaving the others waiting."""
    mean_loss = float(accelerator.reduce(p.interval_loss, reduction="mean")) / p.interval_batches
    if not math.isfinite(mean_loss):
        raise LoramboError(f"loss became {mean_loss} by step {p.step}; lower train.lr "
                           f"(now {cfg.train.lr:g}) or set train.mixed_precision=no")
    rate = p.interval_batches * cfg.train.batch_size * accelerator.num_processes / (time.perf_counter() - t_interval)
    bar.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{rate:.1f}")
    log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0], "train/samples_per_second": rate}, p.step)
    p.interval_loss, p.interval_batches = 0.0, 0
    return time.perf_counter()


def training_steps(cfg, train_examples: int, num_processes: int) -> int:
    batches_per_epoch = train_examples // cfg.train.batch_size // num_processes
    if batches_per_epoch == 0:
        raise LoramboError(f"training split has {train_examples} examples, fewer than one batch per process; "
                           f"lower train.batch_size (now {cfg.train.batch_size})")
    return cfg.train.max_steps or max(1, cfg.train.epochs * batches_per_epoch // cfg.train.grad_accum)
