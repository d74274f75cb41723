"""Instruction tuning scored by generation (issue 19): the answer parser, the offline arithmetic task, the
response-only loss and its masks, batched generation against one prompt at a time, forgetting, local JSONL
files, length-grouped batches, and a whole run on a tiny GPT-2 whose saved adapter reproduces its scores."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from lorambo.errors import LoramboError
from lorambo.instruct import (
    IGNORE,
    PadCollator,
    arithmetic_problems,
    encode_example,
    general_text_loss,
    instruct_rows,
    is_correct,
    left_padded,
    parse_answer,
    prompt_ids,
    prompt_text,
    response_loss,
)
from lorambo.models import build_model, build_tokenizer
from tests.helpers import STATS_FEW, compose_cfg, run_in_process, run_main

TINY = ["model=tiny_gpt2", "task=arithmetic", "task.sizes={train:64,validation:16,test:12}",
        "task.forgetting.max_eval_samples=8", "task.max_new_tokens=12", "task.eval_batch_size=5"]


@pytest.mark.parametrize("text,expected", [
    ("12 + 7 = 19. The answer is: 19", "19"), ("so the total is 1,234.", "1234"), ("#### 42", "42"),
    ("The answer is 7 apples, not 9", "7"), ("THE ANSWER IS:-3.5 or so", "-3.5"), ("no number here", None),
    ("first 3, then 5", "5"), ("The answer is: none, but 8 earlier", "8")])
def test_parse_answer_reads_the_final_number(text, expected):
    assert parse_answer(text) == expected


def test_exact_match_compares_numbers():
    assert is_correct("... The answer is: 42.0", "#### 42") and is_correct("it is 1,000", "The answer is: 1000")
    assert not is_correct("The answer is: 41", "#### 42") and not is_correct("no idea", "#### 42")


def test_arithmetic_problems_are_right_reproducible_and_split_apart():
    problems = arithmetic_problems(300, seed=0)
    assert problems == arithmetic_problems(300, seed=0)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "%": lambda a, b: a % b}
    for p in problems:  # every worked step is true arithmetic and the answer is the last step's result
        steps = re.findall(r"(\d+) ([-+*%]) (\d+) = (-?\d+)", p["response"])
        assert len(steps) == 2 and all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in steps)
        assert parse_answer(p["response"]) == steps[-1][3]
    cfg = compose_cfg(TINY).task
    rows = instruct_rows(cfg)
    assert [len(rows[s]) for s in ("train", "validation", "test")] == [64, 16, 12]
    assert not {r["prompt"] for r in rows["test"]} & {r["prompt"] for r in rows["train"]}


def tokenizer_and_task(overrides=()):
    cfg = compose_cfg([*TINY, *overrides])
    return build_tokenizer(cfg.model), cfg


def test_the_loss_is_on_the_response_tokens_only():
    tokenizer, cfg = tokenizer_and_task()
    row = {"prompt": "Ana has 3 coins and gets 4 more.", "response": "3 + 4 = 7. The answer is: 7"}
    example = encode_example(tokenizer, row, cfg.task)
    prompt = prompt_ids(tokenizer, prompt_text(tokenizer, row["prompt"], cfg.task))
    n = len(prompt)
    assert example["input_ids"][:n] == prompt and example["labels"][:n] == [IGNORE] * n
    assert example["labels"][n:] == example["input_ids"][n:] and example["labels"][-1] == tokenizer.sep_token_id
    assert tokenizer.decode(example["input_ids"][n:-1]).replace(" ", "") == row["response"].lower().replace(" ", "")


def test_response_loss_is_the_token_mean_over_every_batch():
    tokenizer, cfg = tokenizer_and_task()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, tokenizer).eval()
    examples = [encode_example(tokenizer, r, cfg.task) for r in instruct_rows(cfg.task)["validation"][:7]]
    loader = torch.utils.data.DataLoader(examples, batch_size=3, collate_fn=PadCollator(tokenizer.pad_token_id))
    total, count = 0.0, 0
    with torch.no_grad():  # reference: each example alone, no padding, float64
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].double()
            labels = torch.tensor(e["labels"][1:])
            keep = labels != IGNORE
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    assert response_loss(model, loader) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2"])
def test_the_training_loss_takes_logits_only_from_where_the_responses_begin(model, float64):
    """training_loss asks the model for the logits of the batch's response positions only (logits_to_keep): the
    same number as the model's own loss over every position's logits, from fewer logits."""
    from lorambo.evaluation import training_loss
    from lorambo.models import resolve_family

    cfg = compose_cfg([f"model={model}", "task=arithmetic"])
    resolve_family(cfg)
    tokenizer = build_tokenizer(cfg.model)
    torch.manual_seed(0)
    net = build_model(cfg.model, cfg.task, tokenizer).double().eval()
    examples = [encode_example(tokenizer, r, cfg.task) for r in instruct_rows(cfg.task)["train"][:4]]
    batch = PadCollator(tokenizer.pad_token_id)(examples)
    kept = []
    net.register_forward_hook(lambda m, args, kwargs, out: kept.append(out.logits.shape[1]), with_kwargs=True)
    loss = training_loss(net, batch, "instruct")
    first = int((batch["labels"][:, 1:] != IGNORE).any(0).int().argmax())
    assert 0 < first and kept == [batch["input_ids"].shape[1] - first]  # the prompts' logits were never made
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(net(**batch).loss), rel=1e-6)  # both in float32 (as transformers)


def test_the_chat_template_is_used_when_the_tokenizer_has_one():
    tokenizer, cfg = tokenizer_and_task()
    assert prompt_text(tokenizer, "2 + 2?", cfg.task) == "Question: 2 + 2?\nAnswer: "
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}{% endfor %} <assistant>"
    assert prompt_text(tokenizer, "2 + 2?", cfg.task) == "<user> 2 + 2? <assistant>"
    _, plain = tokenizer_and_task(["task.chat_template=false"])
    assert prompt_text(tokenizer, "2 + 2?", plain.task) == "Question: 2 + 2?\nAnswer: "


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    tokenizer, cfg = tokenizer_and_task()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task, tokenizer).eval()
    prompts = [prompt_ids(tokenizer, prompt_text(tokenizer, r["prompt"], cfg.task))
               for r in instruct_rows(cfg.task)["test"][:4]]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = left_padded(tokenizer, prompts)
    together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1]:]
    for row, p in zip(together, prompts):
        alone = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               **settings)[0, len(p):]
        assert row.tolist() == alone.tolist()


def test_fisher_samples_only_the_response_positions():
    from lorambo.sensitivity import sampled_label_loss

    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 4, 4, 4, 4]])
    logits = torch.randn(2, 5, 11)
    _, count = sampled_label_loss(logits, "instruct", torch.Generator().manual_seed(0), labels)
    assert count == int((labels[:, 1:] != IGNORE).sum()) == 6


def test_length_grouped_batches_are_seeded_by_epoch():
    from lorambo.data import length_grouped_sampler

    lengths = [(i * 37) % 50 + 1 for i in range(1024)]
    sampler = length_grouped_sampler(4, lengths, seed=3)
    sampler.set_epoch(0)
    first, again = list(sampler), list(sampler)
    sampler.set_epoch(1)
    other = list(sampler)
    assert sorted(first) == list(range(1024)) and first == again and first != other

    def mean_spread(order):
        return sum(max(lengths[i] for i in order[k:k + 4]) - min(lengths[i] for i in order[k:k + 4])
                   for k in range(0, len(order), 4)) / (len(order) / 4)

    shuffled = torch.randperm(1024, generator=torch.Generator().manual_seed(0)).tolist()
    assert mean_spread(first) < 3 < 20 < mean_spread(shuffled)  # sorted within mega-batches of 200


def test_local_instruct_reads_your_jsonl_with_your_field_names(tmp_path, monkeypatch, capfd):
    rows = arithmetic_problems(40, seed=5)
    for split, part in (("train", rows[:24]), ("validation", rows[24:32]), ("test", rows[32:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"q": r["prompt"], "a": r["response"]}) + "\n"
                                                         for r in part))
    files = [f"task.files.{s}={tmp_path / s}.jsonl" for s in ("train", "validation", "test")]
    cfg = compose_cfg(["model=tiny_gpt2", "task=local_instruct", "task.prompt_field=q", "task.response_field=a",
                       *files])
    assert instruct_rows(cfg.task)["test"] == [{"prompt": r["prompt"], "response": r["response"]} for r in rows[32:]]
    (tmp_path / "test.jsonl").write_text('{"q": "x"}\n')
    code, _, err = run_main(["model=tiny_gpt2", "task=local_instruct", "task.prompt_field=q", "task.response_field=a",
                             *files, "logger=none"], tmp_path, monkeypatch, capfd)
    assert code != 0 and "line 1: not a JSON record with 'q' and 'a'" in err and "Traceback" not in err


@pytest.mark.slow
def test_an_arithmetic_run_reports_generation_loss_and_forgetting_that_the_saved_adapter_reproduces(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorambo.data import load_task

    overrides = [*TINY, "train.max_steps=4", "train.batch_size=8", "budget=r4", "train.log_every=2"]
    metrics = run_in_process(overrides, tmp_path)
    assert metrics["reported_metrics"] == ["accuracy", "validation_loss", "forgetting"]
    assert metrics["main_metric"] == "accuracy" and 0 <= metrics["accuracy"] <= 1
    assert metrics["forgetting"] == pytest.approx(metrics["general_loss"] - metrics["general_loss_base"])
    cfg = compose_cfg(overrides)
    tokenizer = build_tokenizer(cfg.model)
    data = load_task(cfg.task, cfg.model, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model").eval()
    assert general_text_loss(base, data.evaluate.general, 4) == pytest.approx(metrics["general_loss_base"], rel=1e-5)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    data.evaluate.observe_base(AutoModelForCausalLM.from_pretrained(tmp_path / "base_model"))
    again = data.evaluate(reloaded)
    for key in ("accuracy", "validation_loss", "forgetting"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key


def test_an_instruct_task_needs_a_causal_lm(tmp_path, monkeypatch, capfd):
    code, _, err = run_main(["model=tiny_bert", "task=arithmetic", "logger=none"], tmp_path, monkeypatch, capfd)
    assert code != 0 and "does not fit model 'tiny_bert'" in err and "Traceback" not in err
    with pytest.raises(LoramboError, match="unknown task.source"):
        instruct_rows(compose_cfg(["task=arithmetic", "task.source=nowhere"]).task)


def test_the_report_reads_loss_and_forgetting_as_lower_is_better():
    from lorambo.report.comparison import lower_is_better

    assert lower_is_better("validation_loss") and lower_is_better("forgetting") and lower_is_better("perplexity")
    assert not lower_is_better("accuracy") and not lower_is_better("accuracy_matched")


def write_splits(folder, n=(24, 8, 6)):
    rows = arithmetic_problems(sum(n), seed=7)
    files, start = [], 0
    for split, size in zip(("train", "validation", "test"), n):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + size]))
        files.append(f"task.files.{split}={folder / split}.jsonl")
        start += size
    return files


def sweep_runs(folder):
    import glob
    import os

    return [json.load(open(p)) for p in glob.glob(os.path.join(folder, "**", "metrics.json"), recursive=True)
            if json.load(open(p))["eval_splits"] != ["dev"]]


@pytest.mark.slow
def test_llm_method_comparison_runs_every_row_at_two_steps_on_a_tiny_llama(tmp_path, monkeypatch, capfd):
    """The GPU preset as shipped, with the model and data swapped for a tiny Llama and local files."""
    from tests.helpers import run_here

    result = run_here(["experiment=llm_method_comparison", "model=tiny_llama", "model.pretrained=null",
                      "task=local_instruct", *write_splits(tmp_path), "budget=r2", "train.max_steps=2",
                      "task.max_new_tokens=4", "train.mixed_precision=no", "logger=none", *STATS_FEW,
                      "hydra.sweep.dir=sweep"], tmp_path, monkeypatch, capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sweep_runs(tmp_path / "sweep")
    assert sorted(r["allocator"] for r in runs) == sorted(
        ["uniform", "frobenius_greedy", "hessian_offline", "hessian_online", "data_weighted", "eva", "gora", "dora",
         "adalora"])
    cfg = json.loads(json.dumps(compose_cfg(["experiment=llm_method_comparison"]).lora.alpha))
    assert cfg == 64 and all(r["steps"] == 2 and "forgetting" not in r and "accuracy" in r for r in runs)
    assert all(set(r["ranks"]) <= {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
               for r in runs)


@pytest.mark.slow
def test_llm_track_cpu_runs_tuned_rows_with_forgetting_and_a_report(tmp_path, monkeypatch, capfd):
    from tests.helpers import run_here

    result = run_here(["experiment=llm_track_cpu", "model=tiny_gpt2", "table_row=uniform,hessian_online", "seed=0",
                      "task.sizes={train:96,validation:8,test:6}", "task.max_train_samples=96",
                      "task.forgetting.max_eval_samples=4", "task.max_new_tokens=4", "train.max_steps=2",
                      "train.batch_size=4",  # the preset's 32 x 96 tokens of GPT-2's 50,257 logits: 600 MB a step
                      "hydra.sweeper.lr_factors=[1.0]", *STATS_FEW, "hydra.sweep.dir=sweep"], tmp_path, monkeypatch,
                     capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sweep_runs(tmp_path / "sweep")
    assert sorted(r["allocator"] for r in runs) == ["hessian_online", "uniform"]
    # the preset's first column and search metric: the validation loss (accuracy sits at the floor on this base)
    assert all(r["reported_metrics"] == ["validation_loss", "accuracy", "forgetting"] for r in runs)
    report = run_here(["sweep"], tmp_path, monkeypatch, capfd, program="lorambo-report")
    assert report.returncode == 0 and "forgetting" in report.stdout, report.stderr[-2000:]


def test_sts_b_reports_pearson_spearman_and_their_mean():
    import numpy as np

    from lorambo.metrics import task_metrics

    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 50)
    predictions = labels + rng.normal(0, 1.5, 50)
    out = task_metrics(["pearson", "spearman", "pearson_spearman"], predictions[:, None], labels)
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # no ties: Spearman is Pearson of the ranks
    pearson = np.corrcoef(predictions, labels)[0, 1]
    spearman = np.corrcoef(rank(predictions), rank(labels))[0, 1]
    assert out["pearson"] == pytest.approx(pearson) and out["spearman"] == pytest.approx(spearman)
    assert out["pearson_spearman"] == pytest.approx((pearson + spearman) / 2)


@pytest.mark.slow
def test_adalora_glue_runs_every_row_at_two_steps_and_reports_the_papers_numbers(tmp_path, monkeypatch, capfd):
    """The GPU preset on a tiny DeBERTa-v3 and a local STS-B copy: AdaLoRA's recipe, its rows, its metrics, and
    AdaLoRA Table 1's numbers beside ours in the report."""
    from tests.helpers import run_here, write_csv_splits

    def row(rng):
        score = rng.uniform(0, 5)
        return [f"a film of {round(score)} stars", "a good film", score]

    glue = write_csv_splits(tmp_path / "stsb", ["sentence1", "sentence2", "label"], row,
                            {"train": 64, "validation": 24})
    cfg = compose_cfg(["experiment=adalora_glue", "task=stsb"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.task.max_length, cfg.train.batch_size) == (25, 2.2e-3, 128, 32)
    result = run_here(["experiment=adalora_glue", "task=stsb", f"task.dataset.path={glue}", "task.dataset.name=null",
                      "model=tiny_deberta_v3", "model.pretrained=null", "seed=0", "train.max_steps=2",
                      "train.batch_size=8", "logger=none", "hydra.sweep.dir=sweep"], tmp_path, monkeypatch, capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sweep_runs(tmp_path / "sweep")
    assert len(runs) == 10 and all(r["reported_metrics"] == ["pearson", "spearman", "pearson_spearman"]
                                   for r in runs)
    report = run_here(["sweep", "--no-plots"], tmp_path, monkeypatch, capfd, program="lorambo-report")
    assert report.returncode == 0, report.stderr[-2000:]
    assert "AdaLoRA Table 1 (arXiv 2303.10512v2)" in report.stdout and "[~91.68," in report.stdout  # LoRA r=2
