"""Task data: a causal LM split cut to `max_*_samples` tokenises only the documents it needs, and is exactly the
first blocks of the whole split tokenised."""

import pytest
import torch

from lorambo import data as data_module
from lorambo.data import load_task
from lorambo.models import build_tokenizer
from tests.helpers import compose_cfg

LM = ["model=tiny_gpt2", "task=wiki_summaries", "task.max_length=32"]


def count_texts(monkeypatch, tokenizer):
    """(the number of texts of each call of the tokenizer, as it is called from now on; its own __call__)."""
    texts, tokenize = [], type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, text, *a, **k: texts.append(len(text)) or tokenize(
        self, text, *a, **k))
    return texts, tokenize


@pytest.mark.slow
def test_a_limited_lm_split_is_the_first_blocks_of_the_whole_split(monkeypatch):
    monkeypatch.setattr(data_module, "MAP_BATCH", 50)  # small batches: the prefix grows several times
    cfg = compose_cfg([*LM, "task.max_train_samples=300", "task.max_eval_samples=1000000"])
    tokenizer = build_tokenizer(cfg.model)
    texts, tokenize = count_texts(monkeypatch, tokenizer)
    limited = load_task(cfg.task, cfg.model, tokenizer)
    assert sum(texts) < 9029 // 4  # a fraction of the training split's 9,029 documents (and the 1,004 of validation)
    whole = load_task(compose_cfg([*LM, "task.max_train_samples=null", "task.max_eval_samples=null"]).task,
                      cfg.model, tokenizer)
    assert len(limited.train) == 300 < len(whole.train)
    assert torch.equal(limited.train[:]["input_ids"], whole.train[:300]["input_ids"])
    # a limit above the split's size: all of it
    assert torch.equal(limited.evals["validation"][:]["input_ids"], whole.evals["validation"][:]["input_ids"])


def test_a_small_limit_tokenises_a_prefix_of_the_first_batch_and_gets_its_first_blocks(monkeypatch):
    """The first blocks of a map batch need only its first documents: a limit of 40 blocks of 32 tokens reads a few
    dozen documents, not the batch's 1,000, and gets the blocks the whole first batch begins with (here recomputed
    by plain Python from the batch's texts)."""
    cfg = compose_cfg([*LM, "task.max_train_samples=40", "task.max_eval_samples=8"])
    tokenizer = build_tokenizer(cfg.model)
    texts, tokenize = count_texts(monkeypatch, tokenizer)
    limited = load_task(cfg.task, cfg.model, tokenizer)
    assert sum(texts) < data_module.MAP_BATCH // 4
    raw = data_module._text_splits(cfg.task)["train"][:data_module.MAP_BATCH]["text"]
    flat = [t for text in raw for t in tokenize(tokenizer, text, add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id or tokenizer.sep_token_id]]
    expected = torch.tensor([flat[i:i + 32] for i in range(0, 40 * 32, 32)])
    assert torch.equal(limited.train[:]["input_ids"], expected)
    assert torch.equal(limited.train[:]["labels"], expected) and bool(limited.train[:]["attention_mask"].all())
    assert len(limited.evals["validation"]) == 8


def test_tokenising_a_task_does_not_pickle_the_tokenizer_and_its_fingerprint_names_what_changed(monkeypatch):
    """datasets fingerprints a map by pickling its function with dill, the tokenizer in the closure included (about
    1 s a call, half of a tiny run): lorambo names the map itself. The name still changes with what the rows are
    made from (a hub dataset's cache file is found by it)."""
    import datasets.arrow_dataset
    import datasets.fingerprint

    original = datasets.fingerprint.update_fingerprint

    def no_function_hashed(fingerprint, transform, transform_args):
        assert not any(callable(v) for v in transform_args.values()), f"datasets hashed {transform}'s function"
        return original(fingerprint, transform, transform_args)

    for module in (datasets.fingerprint, datasets.arrow_dataset):
        monkeypatch.setattr(module, "update_fingerprint", no_function_hashed)
    fingerprints = {}
    for name, overrides in {"bert": ["model=tiny_bert", "task=rt_snippets"],
                            "bert_short": ["model=tiny_bert", "task=rt_snippets", "task.max_length=8"],
                            "lm": LM, "lm_short": [*LM, "task.max_length=16"]}.items():
        cfg = compose_cfg([*overrides, "task.max_train_samples=32", "task.max_eval_samples=16"])
        fingerprints[name] = load_task(cfg.task, cfg.model, build_tokenizer(cfg.model)).train._fingerprint
    assert len(set(fingerprints.values())) == 4
    again = compose_cfg(["model=tiny_bert", "task=rt_snippets", "task.max_train_samples=32", "task.max_eval_samples=16"])
    assert load_task(again.task, again.model, build_tokenizer(again.model)).train._fingerprint == fingerprints["bert"]
