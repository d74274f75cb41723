"""Step time of lorambo's LoRA training step against a plain PEFT loop with the same ranks.

Both models are the pretrained MiniLM-L6 with LoRA at uniform rank 8 on the same layers, trained on the same
Rotten Tomatoes batches; the two are timed interleaved in one process (blocks of steps, alternating order),
and the script prints median step times, spreads and their ratio, then the same as JSON.

    .venv/bin/python bench/peft_step_time.py [--batch-size 32] [--max-length 64] [--repeats 6] [--steps 5]
"""

import argparse
import json
import statistics
import time

import torch

import lorambo  # noqa: F401  (torchvision fix)
from lorambo.adapters import wrap_lora
from lorambo.allocators import allocate
from lorambo.budget import resolve_p_max
from lorambo.config import compose_config
from lorambo.data import load_task
from lorambo.models import adaptable_layers, build_model, build_tokenizer
from lorambo.train import train_step


def lorambo_stepper(cfg, batches):
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, build_tokenizer(cfg.model))
    layers = adaptable_layers(model, cfg.model.target_modules)
    ranks = allocate("uniform", layers, resolve_p_max(cfg.budget, layers))
    model = wrap_lora(model, ranks, cfg.model.head_modules, cfg.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10**6)
    accelerator = Accelerator(mixed_precision="no")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    return ranks, lambda batch: train_step(model, batch, optimizer, scheduler, accelerator, trainable, cfg)


def plain_peft_stepper(cfg, ranks, batches):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model.pretrained, num_labels=2)
    (r,) = set(ranks.values())
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                             target_modules=sorted(ranks),
                                             modules_to_save=list(cfg.model.head_modules)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 10**6)
    model.train()

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, batches) -> list[float]:
    times = []
    for batch in batches:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    cfg = compose_config(["budget=r8", f"task.max_length={args.max_length}", "task.max_train_samples=2000"])
    data = load_task(cfg.task, cfg.model, build_tokenizer(cfg.model))
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, collate_fn=data.collate_fn)
    batches = [batch for _, batch in zip(range(args.steps), loader)]

    ranks, lorambo_step = lorambo_stepper(cfg, batches)
    peft_step = plain_peft_stepper(cfg, ranks, batches)
    for step in (lorambo_step, peft_step):  # warm-up
        time_steps(step, batches[:2])
    samples = {"lorambo": [], "peft": []}
    for repeat in range(args.repeats):
        order = [("lorambo", lorambo_step), ("peft", peft_step)]
        for name, step in order if repeat % 2 == 0 else order[::-1]:
            samples[name] += time_steps(step, batches)

    result = {"batch_size": args.batch_size, "max_length": args.max_length, "rank": max(ranks.values()),
              "steps_timed_each": len(samples["peft"]), "torch_threads": torch.get_num_threads()}
    for name, times in samples.items():
        q = statistics.quantiles(times, n=4)
        result[f"{name}_median_s"] = statistics.median(times)
        result[f"{name}_iqr_s"] = q[2] - q[0]
    result["ratio_lorambo_over_peft"] = result["lorambo_median_s"] / result["peft_median_s"]
    print(f"{'':10} {'median s/step':>14} {'IQR':>8}")
    for name in samples:
        print(f"{name:10} {result[name + '_median_s']:14.4f} {result[name + '_iqr_s']:8.4f}")
    print(f"ratio lorambo/peft: {result['ratio_lorambo_over_peft']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
