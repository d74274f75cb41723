"""A model's loss and logits on a batch, and its metrics on the evaluation splits."""

import torch
import torch.nn.functional as F

from lorambo.metrics import perplexity, task_metrics


IGNORE = -100  # label of a token that carries no loss (prompt, padding): transformers' and PEFT EVA's mask value

# logits held at once by next_token_losses: 2^28 (1 GiB in float32). A batch above it is run a few rows at a time
# (Llama 3.2's 128k vocabulary at batch 32 x 768 would be 3.2e9, ~12 GB in float32, as one forward)
LOGIT_BUDGET = 2**28


def next_token_losses(model, input_ids, attention_mask, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-position cross-entropy of each next token, float32, rows x (length - 1); the mask of the positions
    that carry a loss: label not IGNORE). `labels`: the targets (default the inputs). Rows go through the model
    in chunks small enough that their logits stay within LOGIT_BUDGET; each row's numbers are the same as in
    one forward (a row never sees another)."""
    labels = input_ids if labels is None else labels
    length, vocab = input_ids.shape[1], model.config.vocab_size
    rows = max(1, LOGIT_BUDGET // (length * vocab))
    losses = []
    for start in range(0, len(input_ids), rows):
        part = slice(start, start + rows)
        logits = model(input_ids=input_ids[part], attention_mask=attention_mask[part]).logits[:, :-1]
        losses.append(F.cross_entropy(logits.float().transpose(1, 2), labels[part, 1:], ignore_index=IGNORE,
                                      reduction="none"))
        del logits
    return torch.cat(losses), labels[:, 1:] != IGNORE


def loss_and_logits(model, batch, task_type):
    """(mean loss, logits) for any family: timm models return logits, Hugging Face models an output."""
    if task_type == "image_classification":
        logits = model(batch["pixel_values"])
        return F.cross_entropy(logits, batch["labels"]), logits
    out = model(**batch)
    return out.loss, out.logits


def training_loss(model, batch, task_type) -> torch.Tensor:
    """The mean loss a training step takes. An instruct batch's loss falls on its responses only, so its logits are
    computed only from the first position where any row's response begins (transformers' `logits_to_keep`): an
    output layer of SmolLM2's 49,152 words over every prompt token was a large share of the step. The same
    cross-entropy over the same tokens as the model's own loss (statistics read every position's logits through
    loss_and_logits)."""
    if task_type != "instruct" or not takes_logits_to_keep(model):
        return loss_and_logits(model, batch, task_type)[0]
    labels = batch["labels"]
    scored = (labels[:, 1:] != IGNORE).any(0)  # position t predicts token t + 1
    first = int(scored.int().argmax())  # a host read of one number (a sync, as the loss's .item() is)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                logits_to_keep=labels.shape[1] - first)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, first + 1:].reshape(-1),
                           ignore_index=IGNORE)


_TAKES_LOGITS_TO_KEEP: dict[type, bool] = {}


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM under `model` (DDP's, torch.compile's and PEFT's wrappers aside) takes logits_to_keep."""
    import inspect

    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(base) not in _TAKES_LOGITS_TO_KEEP:
        _TAKES_LOGITS_TO_KEEP[type(base)] = "logits_to_keep" in inspect.signature(base.forward).parameters
    return _TAKES_LOGITS_TO_KEEP[type(base)]


@torch.no_grad()
def evaluate(model, loader, task_cfg, accelerator) -> dict[str, float]:
    model.eval()
    gathered, labels = [], []
    for batch in loader:
        if task_cfg.type == "lm":
            # per-block mean token loss; blocks have equal length, so their mean is the token mean
            per_block = next_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
            gathered.append(accelerator.gather_for_metrics(per_block.mean(1)).cpu())
        else:
            loss, logits = loss_and_logits(model, batch, task_cfg.type)
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
