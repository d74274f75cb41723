"""What a user on a CUDA GPU with the hub hits first, checked on this CPU machine: each test fails on the code
before its fix (the regression named in its docstring)."""

import pytest
import torch
from omegaconf import OmegaConf

from lorambo import devices, models
from lorambo.cli import group_options
from lorambo.config import compose_config
from tests.helpers import preset_configs

PRESETS = [p for p in group_options("experiment") if p != "smoke"]


def fake_gpu(monkeypatch, bf16_units: bool):
    """torch.cuda as a GPU reports itself: is_bf16_supported() is True through emulation on pre-Ampere GPUs,
    and only including_emulation=False says whether the hardware has bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: bf16_units or including_emulation)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.slow
@pytest.mark.xdist_group("presets")  # preset_configs: composed once, on one worker
def test_a_full_fine_tuning_row_trains_float32_weights_at_its_own_rate(preset, monkeypatch):
    """Regression: adalora_glue's global `train.lr: ${task.adalora_recipe.lr}` made its full-FT row train at
    the adapter rates, and base_dtype auto made that base bf16 under AdamW."""
    fake_gpu(monkeypatch, bf16_units=True)
    full_ft = [(cell, cfg) for cell, cfg in preset_configs(preset) if cfg.method.name == "full_ft"]
    for cell, cfg in full_ft:
        assert cfg.train.lr == cfg.model.full_ft_lr, cell
        assert models.base_dtype(cfg.model, trains_base=True) == torch.float32
    if preset == "adalora_glue":
        assert full_ft
        rte = compose_config(["experiment=adalora_glue", "task=rte", "table_row=full_ft"])
        lora = compose_config(["experiment=adalora_glue", "task=rte", "table_row=lora_r2"])
        assert rte.train.lr == 2e-5 and lora.train.lr == lora.task.adalora_recipe.lr != 2e-5


def test_a_full_fine_tuning_base_loads_in_float32_where_adapters_get_bf16(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, bf16_units=True)
    cfg = compose_config(["model=tiny_llama", "model.base_dtype=auto", "task=wiki_summaries"])
    models.resolve_family(cfg)
    assert models.base_dtype(cfg.model) == torch.bfloat16
    model = models.build_model(cfg.model, cfg.task, models.build_tokenizer(cfg.model), trains_base=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_auto_precision_is_bf16_only_where_the_gpu_has_bf16_units(monkeypatch):
    """Regression: torch.cuda.is_bf16_supported() (emulation included) made a V100 or T4 train in emulated bf16;
    without bf16 units auto is fp16 (accelerate scales the loss) and the frozen base stays float32."""
    fake_gpu(monkeypatch, bf16_units=False)
    assert devices.resolve_mixed_precision("auto") == "fp16"
    assert models.base_dtype(compose_config(["model=llama"]).model) == torch.float32
    fake_gpu(monkeypatch, bf16_units=True)
    assert devices.resolve_mixed_precision("auto") == "bf16"
    assert models.base_dtype(compose_config(["model=llama"]).model) == torch.bfloat16


def test_full_fine_tuning_refuses_a_quantised_base():
    from lorambo.errors import LoramboError

    cfg = compose_config(["model=tiny_llama", "task=wiki_summaries", "model.quantize=4bit"])
    models.resolve_family(cfg)
    with pytest.raises(LoramboError, match="full fine-tuning cannot train"):
        models.build_model(cfg.model, cfg.task, models.build_tokenizer(cfg.model), trains_base=True)


@pytest.mark.slow
def test_metrics_say_which_precision_and_base_dtype_ran(tmp_path):
    from tests.helpers import run_in_process

    metrics = run_in_process(["experiment=smoke", "train.max_steps=2", "task.max_train_samples=32",
                              "task.max_eval_samples=16", "train.mixed_precision=no"], tmp_path)
    assert metrics["mixed_precision"] == "no" and metrics["base_dtype"] == "float32"
    assert metrics["quantize"] is None
    assert OmegaConf.create(metrics)  # plain JSON values


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An ImageFolder as ImageNet has it: JPEGs in RGB, CMYK and greyscale (L), two classes, two splits."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("validation", 12)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n // 2):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=rng, dtype=torch.uint8).numpy()
                image = Image.fromarray(pixels, "RGB")
                image = {0: image, 1: image.convert("CMYK"), 2: image.convert("L")}[i % 3]
                image.save(folder / f"{i}.jpg")
    return str(root)


IMAGES = ["model=tiny_resnet", "task=imagenet1k", "task.num_labels=2", "model.in_chans=3",
          "model.mean=[0.5,0.5,0.5]", "model.std=[0.25,0.25,0.25]", "model.image_size=16"]


def test_cmyk_and_greyscale_jpegs_become_three_channels(image_folder):
    """Regression: a CMYK JPEG reached the 3-channel Normalize with 4 channels."""
    from PIL import Image

    from lorambo.data import load_task

    modes = {Image.open(p).mode for p in __import__("glob").glob(f"{image_folder}/train/*/*.jpg")}
    assert modes == {"RGB", "CMYK", "L"}
    cfg = compose_config([*IMAGES, f"task.data_dir={image_folder}"])
    data = load_task(cfg.task, cfg.model, None, seed=0)
    for dataset in (data.train, data.evals["validation"]):
        shapes = {tuple(dataset[i]["pixel_values"].shape) for i in range(len(dataset))}
        assert shapes == {(3, 16, 16)}


@pytest.mark.slow
def test_any_number_of_loader_workers_gives_the_same_run(image_folder, tmp_path):
    """Decoding in workers (train.num_workers) changes nothing but the speed: the same losses and metric for
    the same seed with augmentation on (each image's crop and flip seeded by seed, epoch and index)."""
    import json

    from tests.helpers import run_in_process

    def losses(run_dir):
        with open(run_dir / "metrics_log.jsonl") as f:
            return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]

    common = [*IMAGES, f"task.data_dir={image_folder}", "logger=none", "train.batch_size=4", "train.epochs=2",
              "train.log_every=1", "train.mixed_precision=no"]
    runs = {n: run_in_process([*common, f"train.num_workers={n}"], tmp_path / f"w{n}") for n in (0, 2)}
    assert runs[0]["steps"] == 12 and losses(tmp_path / "w0") == losses(tmp_path / "w2")
    assert runs[0]["accuracy"] == runs[2]["accuracy"]
    repeat = run_in_process([*common, "train.num_workers=0", "seed=1"], tmp_path / "seed1")
    assert losses(tmp_path / "seed1") != losses(tmp_path / "w0")  # the augmentation does follow the seed


def test_loaders_pin_memory_and_use_workers_only_on_a_gpu(monkeypatch):
    from lorambo import data as data_module

    cfg = compose_config(["experiment=smoke"])
    task = data_module.TaskData(list(range(64)), {"validation": list(range(8))}, None)
    train, _ = data_module.data_loaders(cfg, task)
    assert train.num_workers == 0 and not train.pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "machine_cores", lambda: 16)
    train, evals = data_module.data_loaders(cfg, task, processes=2)
    assert train.num_workers == 7 and train.pin_memory and evals["validation"].num_workers == 7


@pytest.mark.slow
def test_wikitext_lines_are_concatenated_as_run_clm_does(tmp_path):
    """Regression: an end token after every WikiText line, empty lines included (a third of them), added easy
    tokens and made perplexity incomparable with published GPT-2 numbers."""
    import json

    from lorambo.data import load_task
    from lorambo.models import build_tokenizer

    lines = [" = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 : Unrecorded Chronicles is a game .\n",
             "", " = = Gameplay = = \n", "", " The game began development in 2010 , carrying over work .\n"] * 40
    for split in ("train", "validation"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": line}) + "\n" for line in lines)
    cfg = compose_config(["model=tiny_gpt2", "task=wikitext103", f"task.dataset.path={tmp_path}",
                          "task.dataset.name=null", "task.max_length=16"])
    tokenizer = build_tokenizer(cfg.model)
    data = load_task(cfg.task, cfg.model, tokenizer)
    stream = [t for line in lines for t in tokenizer(line, add_special_tokens=False)["input_ids"]]
    blocks = [list(b["input_ids"].tolist()) for b in data.train]
    end = tokenizer.eos_token_id or tokenizer.sep_token_id  # what an end token would have been
    assert end not in stream and all(end not in b for b in blocks)
    assert [t for b in blocks for t in b] == stream[: len(blocks) * 16]  # the text's own tokens, in order
    assert len(stream) - len(blocks) * 16 < 16  # only the last partial block is dropped
    documents = compose_config(["model=tiny_gpt2", "task=wiki_summaries"]).task
    assert documents.get("document_end", "eos") == "eos"  # documents still end with the end token


def bos_by_post_processor():
    """A tokenizer as Llama 3's is: BOS added by its post-processor, no add_bos_token to say so."""
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "what is two plus three the answer : five".split()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_every_instruct_prompt_starts_as_the_models_tokenizer_starts_it():
    """Regression: prompts tokenized with add_special_tokens=False lost the BOS that Llama 3's post-processor
    adds (prompt_ids looked only at add_bos_token)."""
    from lorambo.instruct import encode_example, prompt_ids

    tokenizer = bos_by_post_processor()
    assert not getattr(tokenizer, "add_bos_token", False)
    own = tokenizer("what is two plus three")["input_ids"]
    assert prompt_ids(tokenizer, "what is two plus three") == own == [0, 4, 5, 6, 7, 8]
    assert prompt_ids(tokenizer, "<s> what is two") == [0, 4, 5, 6]  # a template's own BOS: not twice
    task = compose_config(["model=tiny_gpt2", "task=arithmetic", "task.chat_template=false",
                           "task.prompt_template='{prompt}'"]).task
    example = encode_example(tokenizer, {"prompt": "what is two plus three", "response": "the answer : five"}, task)
    assert example["input_ids"][:6] == own and example["labels"][:6] == [-100] * 6
    bert = __import__("lorambo.models", fromlist=["x"]).build_tokenizer(compose_config(["model=tiny_gpt2"]).model)
    assert prompt_ids(bert, "two plus three") == bert("two plus three", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_validation_losses_never_hold_the_whole_batchs_logits(monkeypatch):
    """Regression: instruct's validation loss (and the forgetting and perplexity losses) took batch x length x
    vocabulary logits in float32 at once (~31 GB for Llama 3.2 at batch 32 x 768). Now a few rows at a time,
    within LOGIT_BUDGET: the same numbers as a float64 reference over the whole batch."""
    from torch.utils.data import DataLoader

    from lorambo import evaluation
    from lorambo.data import load_task
    from lorambo.instruct import general_text_loss, response_loss

    cfg = compose_config(["model=tiny_gpt2", "task=arithmetic", "task.max_length=48", "task.max_eval_samples=12",
                          "task.max_train_samples=16", "task.max_test_samples=2"])
    models.resolve_family(cfg)
    tokenizer = models.build_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = models.build_model(cfg.model, cfg.task, tokenizer).eval()
    data = load_task(cfg.task, cfg.model, tokenizer)
    loader = DataLoader(data.evals["validation"], batch_size=12, collate_fn=data.collate_fn)
    batch = next(iter(loader))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                  reduction="sum") / (labels != -100).sum()
    width, vocab = batch["input_ids"].shape[1], model.config.vocab_size
    monkeypatch.setattr(evaluation, "LOGIT_BUDGET", 5 * width * vocab)  # five rows at a time
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: seen.append(kw["input_ids"].shape[0]) or forward(**kw))
    whole = torch.nn.functional.cross_entropy(logits.float()[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                              reduction="sum") / (labels != -100).sum()  # what was computed before
    got = response_loss(model, loader)
    assert got == pytest.approx(float(whole), rel=1e-6) and got == pytest.approx(float(reference), rel=1e-5)
    assert max(seen) == 5 and sum(seen) == 12
    blocks = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in batch["input_ids"]]
    everything = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                                                   reduction="mean")
    assert general_text_loss(model, blocks, 12) == pytest.approx(float(everything), rel=1e-5)


GATED = ("You are trying to access a gated repo.\nMake sure to have access to it at "
         "https://huggingface.co/meta-llama/Llama-3.2-1B.\n401 Client Error.")
CUSTOM_CODE = ("The repository for org/custom contains custom code which must be executed to correctly load the "
               "model. Please pass the argument `trust_remote_code=True` to allow custom code to be run.")


@pytest.mark.parametrize("failure, expected", [
    (OSError(GATED), "is a gated model: accept its licence on its hub page, then log in with `huggingface-cli login`"),
    (ValueError(CUSTOM_CODE), "set model.trust_remote_code=true"),
])
def test_a_hub_model_that_needs_a_login_or_its_own_code_says_so_in_one_line(failure, expected, tmp_path,
                                                                             monkeypatch, capfd):
    """What the hub answers for a gated model (Llama 3.2, Mistral) or one with custom code, as transformers words
    it: one `lorambo-run: error:` line naming the fix, no traceback, no metrics.json."""
    import transformers

    from tests.helpers import run_main

    def refuse(name, **kwargs):
        raise failure

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    code, out, err = run_main(["model=llama", "task=wiki_summaries", "logger=none",
                               f"hydra.run.dir={tmp_path}/run"], tmp_path, monkeypatch, capfd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err, err
    assert lines[-1].startswith("lorambo-run: error: ") and expected in lines[-1]
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.slow
def test_legacy_hub_ids_load_as_the_current_ones_and_custom_code_is_opt_in(monkeypatch):
    import transformers

    asked = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda name, **kw: asked.append((name, kw["trust_remote_code"])) or "config")
    for legacy, current in [("bert-base-uncased", "google-bert/bert-base-uncased"),
                            ("roberta-base", "FacebookAI/roberta-base"), ("t5-base", "google-t5/t5-base"),
                            ("gpt2", "openai-community/gpt2"), ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B")]:
        models.hf_config(compose_config(["model=hf", f"model.pretrained={legacy}"]).model)
        assert asked[-1] == (current, False)
    models.hf_config(compose_config(["model=hf", "model.pretrained=org/custom", "model.trust_remote_code=true"]).model)
    assert asked[-1] == ("org/custom", True)
    for name in ("bert", "roberta", "t5", "gpt2"):  # the shipped configs name the current ids
        assert "/" in compose_config([f"model={name}"]).model.pretrained


@pytest.mark.slow
def test_metrics_record_the_source_commit_and_what_the_hub_served(tmp_path, monkeypatch):
    import subprocess

    from lorambo import results
    from tests.helpers import run_in_process

    metrics = run_in_process(["experiment=smoke", "train.max_steps=2", "task.max_train_samples=32",
                              "task.max_eval_samples=16"], tmp_path)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=results.__file__.rsplit("/lorambo/", 1)[0],
                          capture_output=True, text=True).stdout.strip()
    assert metrics["source"]["commit"] == head and isinstance(metrics["source"]["dirty"], bool)
    assert metrics["hub_revisions"] == {"model": None, "datasets": {}}  # a config-built model, a local file

    class Config:
        _commit_hash = "a" * 40

    model = type("Model", (), {"config": Config()})()
    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, path: asked.append(path) or type("Info", (), {"sha": "b" * 40})())
    instruct = compose_config(["experiment=llm_method_comparison"]).task
    got = results.hub_revisions(model, instruct)
    assert got["model"] == "a" * 40
    assert got["datasets"] and set(got["datasets"].values()) == {"b" * 40} and sorted(asked) == sorted(got["datasets"])
    assert "Salesforce/wikitext" in got["datasets"]  # the forgetting text's dataset too


def test_the_peft_protocol_preset_matches_peft_where_it_can():
    """PEFT's method_comparison/MetaMathQA (default_training_params.json, data.py, run.py, utils.py): what
    lorambo's llm_method_comparison sets to match it; the differences that remain are listed in the README."""
    cfg = compose_config(["experiment=llm_method_comparison", "hydra.mode=RUN", "table_row=uniform"])
    task, train = cfg.task, cfg.train
    assert task.prompt_template == "Question: {prompt} Think step by step.\nAnswer:" and task.chat_template is False
    assert task.loss_on_prompt and task.max_chars == 1300 and task.max_length == 768
    assert task.max_new_tokens == 300 and task.max_eval_samples == 50
    assert task.dataset.validation.path == "openai/gsm8k" and task.dataset.validation.split == "train"
    assert task.dataset.test.path == "openai/gsm8k" and task.dataset.test.split == "test"
    assert (train.max_steps, train.batch_size, train.lr, train.scheduler) == (5000, 4, 1e-4, "cosine")
    assert (train.warmup_ratio, train.weight_decay, train.max_grad_norm) == (0.1, 0.1, 1.0)
    assert cfg.model.pretrained == "meta-llama/Llama-3.2-3B" and cfg.lora.alpha == 64 and cfg.budget.rank == 32
    assert not train.gradient_checkpointing and cfg.seed == 0


@pytest.mark.slow
def test_prompt_tokens_carry_loss_and_long_pairs_are_dropped_when_the_task_says_so():
    from lorambo.instruct import IGNORE, encode_example, load_instruct_task

    tokenizer = bos_by_post_processor()
    base = compose_config(["model=tiny_gpt2", "task=arithmetic", "task.chat_template=false",
                           "task.prompt_template='{prompt}'"]).task
    row = {"prompt": "what is two plus three", "response": "the answer : five"}
    masked = encode_example(tokenizer, row, base)
    base.loss_on_prompt = True
    every = encode_example(tokenizer, row, base)
    assert masked["labels"][:6] == [IGNORE] * 6 and every["labels"] == every["input_ids"]
    assert masked["labels"][6:] == every["labels"][6:]
    cfg = compose_config(["model=tiny_gpt2", "task=arithmetic", "task.max_chars=120", "task.max_eval_samples=4",
                          "task.max_test_samples=2"])
    data = load_instruct_task(cfg.task, cfg.model, models.build_tokenizer(cfg.model))
    everything = load_instruct_task(compose_config(["model=tiny_gpt2", "task=arithmetic", "task.max_eval_samples=4",
                                                    "task.max_test_samples=2"]).task, cfg.model,
                                    models.build_tokenizer(cfg.model))
    assert 0 < len(data.train) < len(everything.train)
