"""Instruction tuning scored by generation (issue 19): prompt/response datasets, the loss on the response tokens
only, and an evaluation that generates each test answer greedily and checks its final number (GSM8K's exact
match), with the validation loss and forgetting (the change of cross-entropy on held-out general text between
the base and the adapted model), as PEFT's method-comparison suite reports them (../shared/METHODS.md sec. 8)."""

import json
import math
import os
import random
import re

import numpy as np
import torch

from lorambo.errors import LoramboError
from lorambo.evaluation import IGNORE, next_token_losses

# --- answers: what the scorer reads from a generated text

# "The answer is: 42" (MetaMathQA), "#### 42" (GSM8K): the number after the last such delimiter, else the last
# number in the text; commas inside numbers and a trailing full stop dropped
DELIMITER = re.compile(r"(?:the\s+answer\s+is\s*:?|####)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_answer(text: str) -> str | None:
    """The final number a text gives as its answer, or None."""
    parts = DELIMITER.split(text)
    if len(parts) > 1:  # the first number after the last delimiter
        after = NUMBER.findall(parts[-1])
        if after:
            return after[0].replace(",", "")
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def answer_value(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def is_correct(generated: str, reference: str) -> bool:
    """Exact match of the final numbers (GSM8K's scorer: 42 and 42.0 match, a missing number does not)."""
    got, want = answer_value(parse_answer(generated)), answer_value(parse_answer(reference))
    return got is not None and want is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-9)


# --- an offline instruction task: arithmetic word problems with worked answers

NAMES = ["Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon"]
THINGS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells"]


def arithmetic_problem(rng: random.Random) -> dict:
    """One two-step word problem with its worked answer ending in MetaMathQA's "The answer is: N"."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    kind = rng.randrange(3)
    if kind == 0:
        prompt = (f"{name} has {a} {thing} and gets {b} more, then gives away {c}. "
                  f"How many {thing} does {name} have now?")
        steps, answer = f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c
    elif kind == 1:
        prompt = f"{name} buys {c} boxes of {b} {thing} and already had {a}. How many {thing} are there in all?"
        steps, answer = f"{c} * {b} = {c * b}. {c * b} + {a} = {c * b + a}.", c * b + a
    else:
        prompt = (f"{name} has {a} {thing}, finds {b} more and shares them equally with {c - 1} friends "
                  f"({c} people in all). How many {thing} are left over after sharing?")
        steps, answer = f"{a} + {b} = {a + b}. {a + b} % {c} = {(a + b) % c}.", (a + b) % c
    return {"prompt": prompt, "response": f"{steps} The answer is: {answer}"}


def arithmetic_problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [arithmetic_problem(rng) for _ in range(n)]


# --- rows: prompt/response pairs per split, whatever the source

SPLITS = ("train", "validation", "test")


def instruct_rows(task_cfg) -> dict[str, list[dict]]:
    """{split: [{prompt, response}]} for train, validation and test."""
    source = task_cfg.source
    if source == "arithmetic":  # each split from its own seed: no problem is shared by chance of the generator
        sizes = task_cfg.sizes
        return {split: arithmetic_problems(int(sizes[split]), seed) for seed, split in enumerate(SPLITS)}
    if source == "local_instruct":
        return {split: _local_rows(task_cfg, split) for split in SPLITS}
    if source == "hub":
        return {split: _hub_rows(task_cfg, split) for split in SPLITS}
    raise LoramboError(f"unknown task.source '{source}' for an instruct task; use arithmetic, local_instruct or hub")


def _fields(task_cfg, spec) -> tuple[str, str]:
    return spec.get("prompt_field", task_cfg.prompt_field), spec.get("response_field", task_cfg.response_field)


def _local_rows(task_cfg, split: str) -> list[dict]:
    spec = task_cfg.files[split]
    path = spec if isinstance(spec, str) else spec.path
    prompt_field, response_field = _fields(task_cfg, {} if isinstance(spec, str) else spec)
    if not path:
        raise LoramboError(f"task.files.{split} is not set; give task.files.{split}=PATH, a JSONL file of "
                           f"{{\"{prompt_field}\": ..., \"{response_field}\": ...}} records")
    if not os.path.exists(str(path)):
        raise LoramboError(f"task.files.{split}: no such file '{path}'; give a JSONL file of "
                           f"{{\"{prompt_field}\": ..., \"{response_field}\": ...}} records")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append({"prompt": str(record[prompt_field]), "response": str(record[response_field])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LoramboError(f"'{path}' line {i}: not a JSON record with '{prompt_field}' and "
                                   f"'{response_field}' ({type(e).__name__}); set task.prompt_field / "
                                   f"task.response_field to your field names") from None
    if not rows:
        raise LoramboError(f"'{path}' holds no records")
    return rows


def _hub_rows(task_cfg, split: str) -> list[dict]:
    import datasets

    spec = task_cfg.dataset[split]
    prompt_field, response_field = _fields(task_cfg, spec)
    try:
        ds = datasets.load_dataset(spec.path, spec.get("name"), split=spec.split)
    except Exception as e:  # the hub or a local folder: fixed by the path either way
        raise LoramboError(f"cannot load dataset '{spec.path}' ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); set task.dataset.{split}.path to a local copy")
    return [{"prompt": str(r[prompt_field]), "response": str(r[response_field])} for r in ds]


def fixed_sample(rows: list, n: int | None) -> list:
    """The first n of a fixed permutation (seed 0), the same for every run."""
    if not n or n >= len(rows):
        return rows
    order = np.random.default_rng(0).permutation(len(rows))[:n]
    return [rows[i] for i in sorted(order)]


# --- tokens

def prompt_text(tokenizer, prompt: str, task_cfg) -> str:
    """The prompt as the model sees it: the tokenizer's chat template when it has one (task.chat_template auto),
    else task.prompt_template."""
    use_chat = task_cfg.get("chat_template", "auto")
    if use_chat is True or (use_chat == "auto" and getattr(tokenizer, "chat_template", None)):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return task_cfg.prompt_template.format(prompt=prompt)


def end_token_id(tokenizer) -> int:
    """The token that ends a response: eos, or [SEP] for a BERT vocabulary (the tiny models' borrowed one)."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise LoramboError("the tokenizer has neither an eos nor a sep token to end a response with")
    return end


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The prompt's tokens, starting as the model's own tokenizer starts a text: with BOS where it adds one
    (Llama 2 and Mistral through add_bos_token, Llama 3 through its post-processor, which no attribute
    shows: so read from what it returns), never twice (a chat template that writes BOS itself), and no end
    token. Other special tokens it adds (BERT's [CLS]) are left out: the small bases here never saw them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos] and tokenizer(text)["input_ids"][:1] == [bos]:
        ids = [bos, *ids]
    return ids


def encode_example(tokenizer, row: dict, task_cfg) -> dict:
    """input_ids = prompt + response + end; labels: IGNORE on the prompt, so the loss is the response's
    (`task.loss_on_prompt`: every token's, as PEFT's method comparison trains)."""
    prompt = prompt_ids(tokenizer, prompt_text(tokenizer, row["prompt"], task_cfg))
    response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [end_token_id(tokenizer)]
    ids = (prompt + response)[: task_cfg.max_length]
    prompt_labels = prompt if task_cfg.get("loss_on_prompt") else [IGNORE] * len(prompt)
    labels = (prompt_labels + response)[: task_cfg.max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class PadCollator:
    """Right-padded batches for training and loss: pad token in input_ids, 0 in the mask, IGNORE in labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE}
        return {key: torch.tensor([list(e[key]) + [value] * (width - len(e[key])) for e in examples])
                for key, value in fill.items()}


def left_padded(tokenizer, prompts: list[list[int]]) -> dict:
    """Prompts padded on the left, so that every row's generation starts right after its prompt."""
    width = max(len(p) for p in prompts)
    return {"input_ids": torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}


def response_loss(model, loader) -> float:
    """Mean cross-entropy per response token (every token weighted alike, whatever its batch)."""
    device, total, count = next(model.parameters()).device, 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}  # position t predicts token t + 1
            losses, scored = next_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            total, count = total + float(losses.sum()), count + int(scored.sum())
    return total / max(count, 1)


def general_text_loss(model, blocks, batch_size: int) -> float:
    """Mean next-token cross-entropy over held-out general-text blocks (forgetting's measure)."""
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    device, total, count = next(model.parameters()).device, 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in DataLoader(blocks, batch_size=batch_size, collate_fn=default_data_collator):
            ids = batch["input_ids"].to(device)
            losses, _ = next_token_losses(model, ids, batch["attention_mask"].to(device))
            total, count = total + float(losses.sum()), count + ids[:, 1:].numel()
    return total / max(count, 1)


class InstructEvaluation:
    """The task's evaluation: test accuracy by greedy generation, validation loss on the response tokens, and
    forgetting (general-text cross-entropy of the adapted model minus the base's, measured before training)."""

    def __init__(self, task_cfg, tokenizer, test_rows: list[dict], validation, general_blocks, collate):
        self.cfg, self.tokenizer, self.test_rows = task_cfg, tokenizer, test_rows
        self.validation, self.general, self.collate = validation, general_blocks, collate
        self.base_general_loss = None
        # tokenised once: every evaluation (each search run's dev, the final test) generates from the same prompts
        self.prompts = [prompt_ids(tokenizer, prompt_text(tokenizer, r["prompt"], task_cfg)) for r in test_rows]

    def observe_base(self, model) -> None:
        if self.general is not None:
            self.base_general_loss = general_text_loss(model, self.general, self.cfg.eval_batch_size)

    def generate(self, model) -> list[str]:
        """Greedy answers for the test prompts, in batches, with a progress bar."""
        from tqdm.auto import tqdm

        model.eval()
        prompts = self.prompts
        answers, size = [], self.cfg.eval_batch_size
        end, device = end_token_id(self.tokenizer), next(model.parameters()).device
        with torch.no_grad():
            for start in tqdm(range(0, len(prompts), size), desc="generate", leave=False):
                batch = {k: v.to(device) for k, v in left_padded(self.tokenizer, prompts[start:start + size]).items()}
                out = model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                     eos_token_id=end, pad_token_id=self.tokenizer.pad_token_id)
                new = out[:, batch["input_ids"].shape[1]:]
                answers += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return answers

    def __call__(self, model) -> dict[str, float]:
        from torch.utils.data import DataLoader

        answers = self.generate(model)
        correct = [is_correct(a, r["response"]) for a, r in zip(answers, self.test_rows)]
        results = {"accuracy": sum(correct) / len(correct),
                   "validation_loss": response_loss(model, DataLoader(self.validation, self.cfg.eval_batch_size,
                                                                      collate_fn=self.collate))}
        if self.general is not None and self.base_general_loss is not None:
            loss = general_text_loss(model, self.general, self.cfg.eval_batch_size)
            results.update(general_loss=loss, general_loss_base=self.base_general_loss,
                           forgetting=loss - self.base_general_loss)
        return results


def load_instruct_task(task_cfg, model_cfg, tokenizer):
    """TaskData for an instruct task: the training examples (with their lengths, for length-grouped batches),
    one evaluation split for the loop's bookkeeping, and the task's own evaluation. With task.dev_fraction, a
    dev split carved from train (fixed, seed 0) stands in for validation and test, as for every task."""
    from lorambo.data import TaskData, _load_splits

    rows = instruct_rows(task_cfg)
    if task_cfg.get("max_chars"):  # PEFT's length filter, in characters (the same for every tokenizer)
        rows["train"] = [r for r in rows["train"] if len(f"{r['prompt']} {r['response']}") <= task_cfg.max_chars]
    train = fixed_sample(rows["train"], task_cfg.get("max_train_samples"))
    validation = fixed_sample(rows["validation"], task_cfg.get("max_eval_samples"))
    test = fixed_sample(rows["test"], task_cfg.get("max_test_samples"))
    split = "validation"
    if task_cfg.get("dev_fraction"):
        order = np.random.default_rng(0).permutation(len(train))
        n_dev = max(1, round(task_cfg.dev_fraction * len(order)))
        if n_dev >= len(order):
            raise LoramboError(f"task.dev_fraction={task_cfg.dev_fraction} leaves nothing to train on; lower it")
        dev = [train[i] for i in sorted(order[:n_dev])]
        train, validation, test, split = [train[i] for i in sorted(order[n_dev:])], dev, dev, "dev"
    encode = lambda part: [encode_example(tokenizer, r, task_cfg) for r in part]
    train_examples, validation_examples = encode(train), encode(validation)
    general = None
    if task_cfg.get("forgetting"):  # held-out general text, as a causal-LM task's validation blocks
        general = _load_splits(task_cfg.forgetting, model_cfg, tokenizer).evals["validation"]
    collate = PadCollator(tokenizer.pad_token_id)
    evaluation = InstructEvaluation(task_cfg, tokenizer, test, validation_examples, general, collate)
    return TaskData(train_examples, {split: validation_examples}, collate,
                    lengths=[len(e["input_ids"]) for e in train_examples], evaluate=evaluation)
