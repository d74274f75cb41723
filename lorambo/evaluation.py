"""A model's loss and logits on a batch, and its metrics on the evaluation splits."""

import torch
import torch.nn.functional as F

from lorambo.metrics import perplexity, task_metrics


def loss_and_logits(model, batch, task_type):
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
        loss, logits = loss_and_logits(model, batch, task_cfg.type)
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


def evaluate_all(model, eval_loaders, task_cfg, accelerator, task_evaluation=None) -> dict[str, float]:
    """One split: plain metric names; several (MNLI): `accuracy_matched`, `accuracy_mismatched`. In float32
    whatever the training precision (only train_step autocasts): the metric is the saved adapter's, as
    `PeftModel.from_pretrained` reloads it. A task with its own evaluation (instruct: generation) runs it."""
    if task_evaluation is not None:
        return task_evaluation(accelerator.unwrap_model(model))
    results = {}
    for split, loader in eval_loaders.items():
        for key, value in evaluate(model, loader, task_cfg, accelerator).items():
            results[key if len(eval_loaders) == 1 else f"{key}_{split}"] = value
    return results


def reported_metrics(task_cfg, splits: list[str]) -> list[str]:
    """The metrics a table shows for this task: the main one, for every evaluation split (MNLI: m and mm); the
    first is the run's main metric."""
    main = task_cfg.main_metric
    if task_cfg.type == "instruct":  # one evaluation, several measures: accuracy, validation loss, forgetting
        return [main, *[m for m in task_cfg.metrics if m != main]]
    named = list(task_cfg.get("eval_splits") or {})  # MNLI: accuracy_matched is accuracy on `matched`
    base = next((main[: -len(s) - 1] for s in [*splits, *named] if main.endswith("_" + s)), main)
    if splits == ["dev"]:  # a dev split carved from train (task.dev_fraction): one split, plain names
        return [base]
    if len(splits) == 1:  # every metric the task names, the main one first (MRPC: F1 and accuracy)
        return [main, *[m for m in task_cfg.get("metrics", []) if m != main]]
    return [f"{base}_{s}" for s in splits]
