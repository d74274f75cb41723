"""Task data: a causal LM split cut to `max_*_samples` tokenises only the documents it needs, and is exactly the
first blocks of the whole split tokenised."""

import torch

from lorambo import data as data_module
from lorambo.data import load_task
from lorambo.models import build_tokenizer
from tests.helpers import compose_cfg

LM = ["model=tiny_gpt2", "task=wiki_summaries", "task.max_length=32"]


def test_a_limited_lm_split_is_the_first_blocks_of_the_whole_split(monkeypatch):
    monkeypatch.setattr(data_module, "MAP_BATCH", 50)  # small batches: the prefix grows several times
    cfg = compose_cfg([*LM, "task.max_train_samples=300", "task.max_eval_samples=1000000"])
    tokenizer = build_tokenizer(cfg.model)
    texts, tokenize = [], type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, text, *a, **k: texts.append(len(text)) or tokenize(
        self, text, *a, **k))
    limited = load_task(cfg.task, cfg.model, tokenizer)
    assert sum(texts) < 9029 // 4  # a fraction of the training split's 9,029 documents (and the 1,004 of validation)
    whole = load_task(compose_cfg([*LM, "task.max_train_samples=null", "task.max_eval_samples=null"]).task,
                      cfg.model, tokenizer)
    assert len(limited.train) == 300 < len(whole.train)
    assert torch.equal(limited.train[:]["input_ids"], whole.train[:300]["input_ids"])
    # a limit above the split's size: all of it
    assert torch.equal(limited.evals["validation"][:]["input_ids"], whole.evals["validation"][:]["input_ids"])
