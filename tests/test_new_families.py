"""Any Hugging Face model (issue 18): the layers to adapt and the head found from the model itself, GQA shapes
costed from the weights, MoE routers left out, and the new families (Llama, Qwen2, Mistral, DeBERTa-v3) end to
end on tiny models built from configs, through their named configs and through model=hf on a local folder."""

import json

import pytest
import torch

from lorambo.budget import resolve_p_max
from lorambo.errors import LoramboError
from lorambo.models import (adaptable_layers, build_tokenizer, found_head_modules, found_target_modules,
                            resolve_family)
from tests.helpers import FAMILIES, FAST, built, compose_cfg, run_and_check, run_in_process, run_main

NEW = {name: FAMILIES[name] for name in ("tiny_llama", "tiny_qwen2", "tiny_mistral", "tiny_deberta_v3")}


@pytest.mark.parametrize("model,task", [("tiny_bert", "rt_snippets"), ("tiny_roberta", "rt_snippets"),
                                        ("tiny_t5", "rt_snippets"), ("tiny_gpt2", "wiki_summaries")])
def test_auto_finds_the_hand_written_layers_and_head(model, task):
    cfg, base = built([f"model={model}", f"task={task}"])
    by_hand = {l.name for l in adaptable_layers(base, cfg.model.target_modules)}
    found = {l.name for l in adaptable_layers(base, found_target_modules(base, model))}
    assert found == by_hand and len(found) >= 8
    assert found_head_modules(base, cfg.model) == list(cfg.model.head_modules)


@pytest.mark.parametrize("model,kv_heads", [("tiny_llama", 2), ("tiny_qwen2", 1), ("tiny_mistral", 2)])
def test_gqa_projections_are_costed_from_their_weights(model, kv_heads):
    cfg, base = built([f"model={model}", "task=wiki_summaries", "budget=r4"])
    layers = {l.name: l for l in adaptable_layers(base, cfg.model.target_modules)}
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks
    head_dim = 32 // 4
    for name, layer in layers.items():
        weight = base.get_submodule(name).weight
        assert (layer.d_out, layer.d_in) == tuple(weight.shape)
        if name.endswith(("k_proj", "v_proj")):
            assert layer.d_out == kv_heads * head_dim < 32
    assert resolve_p_max(cfg.budget, list(layers.values())) == 4 * sum(
        m.weight.shape[0] + m.weight.shape[1] for m in (base.get_submodule(n) for n in layers))


def test_moe_routers_are_left_out_and_the_shared_expert_kept():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=16, intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
        vocab_size=50))
    names = {l.name for l in adaptable_layers(model, "auto")}
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "model.layers.0.mlp.shared_expert_gate" in linear and not any("gate." in n or n.endswith("_gate")
                                                                         for n in names)
    assert {"model.layers.1.mlp.shared_expert.up_proj", "model.layers.1.self_attn.k_proj"} <= names
    assert "lm_head" not in names


def test_explicit_target_modules_win_over_auto():
    cfg, base = built(["model=tiny_llama", "task=wiki_summaries", r"model.target_modules=self_attn\.q_proj$"])
    assert sorted(l.name for l in adaptable_layers(base, cfg.model.target_modules)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_the_family_follows_the_task():
    cfg, base = built(["model=tiny_llama", "task=wiki_summaries"])
    assert cfg.model.family == "causal_lm" and cfg.model.head_modules == [] and "CausalLM" in type(base).__name__
    cfg, base = built(["model=tiny_llama", "task=rt_snippets"])
    assert cfg.model.family == "encoder" and cfg.model.head_modules == ["score"]
    cfg, base = built(["model=tiny_deberta_v3", "task=rt_snippets"])
    assert cfg.model.head_modules == ["pooler", "classifier"]


@pytest.mark.slow
def test_models_that_cannot_be_adapted_get_one_line(tmp_path, monkeypatch, capfd):
    code, _, err = run_main(["model=tiny_resnet", "task=fashion_mnist", "model.target_modules=auto", "logger=none",
                             "train.max_steps=1"], tmp_path, monkeypatch, capfd)
    lines = [line for line in err.splitlines() if line.startswith("lorambo-run: error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err
    assert "no Linear/Conv1D layer inside repeated transformer blocks" in lines[0] and "block stacks found" in lines[0]
    code, _, err = run_main(["model=hf", "task=rt_snippets", "logger=none"], tmp_path, monkeypatch, capfd)
    assert code != 0 and "model=hf needs model.pretrained=ORG/NAME" in err and "Traceback" not in err
    with pytest.raises(LoramboError, match="decoder-only"):
        resolve_family(compose_cfg(["model=hf", "model.pretrained=null", "task=wiki_summaries",
                                    "+model.hf_config={model_type:t5,d_model:8}"]))


def hf_folder_overrides(family, tmp_path):
    """model=hf on a local folder holding the family's tiny model (seed 0), as a user's own model."""
    cfg, base = built(NEW[family])
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    # the tiny models borrow MiniLM's vocabulary: beside a Qwen2 config, transformers 5 would load it as Qwen2's
    build_tokenizer(cfg.model).save_pretrained(tmp_path / "tokenizer")
    overrides = [o for o in NEW[family] if not o.startswith("model=")]
    return cfg, base, folder, ["model=hf", f"model.pretrained={folder}", f"model.tokenizer={tmp_path / 'tokenizer'}",
                               *overrides]


@pytest.mark.parametrize("family", sorted(NEW))
def test_model_hf_on_a_local_folder_finds_the_named_configs_layers_and_head(family, tmp_path):
    cfg, base, _, overrides = hf_folder_overrides(family, tmp_path)
    hf_cfg, hf_base = built(overrides)
    assert hf_cfg.model.family == cfg.model.family
    assert ({l.name: l.cost for l in adaptable_layers(hf_base, hf_cfg.model.target_modules)}
            == {l.name: l.cost for l in adaptable_layers(base, cfg.model.target_modules)})
    assert list(hf_cfg.model.head_modules) == list(cfg.model.head_modules)


@pytest.mark.slow
def test_model_hf_runs_on_a_local_folder(tmp_path):
    cfg, base, folder, overrides = hf_folder_overrides("tiny_qwen2", tmp_path)
    metrics = run_and_check([*overrides, *FAST], tmp_path / "run", folder)
    resolved = (tmp_path / "run" / "config_resolved.yaml").read_text()
    assert metrics["model"] == "hf" and "target_modules: ^(" in resolved
    assert len(metrics["ranks"]) == len(adaptable_layers(base, cfg.model.target_modules))


NEW_MODELS = ["hf", "llama", "qwen2", "mistral", "deberta_v3", "tiny_llama", "tiny_qwen2", "tiny_mistral",
              "tiny_deberta_v3"]


@pytest.mark.slow
def test_every_new_model_composes_with_each_task_of_its_family(tmp_path, monkeypatch, capfd):
    """Each model with each task of its family (assembled from the two composed once each, as test_config.py's
    pairs are), and the command line's own composition of each model."""
    from omegaconf import OmegaConf

    from lorambo.cli import group_options
    from lorambo.models import FAMILY_TASK_TYPES

    tasks = {t: compose_cfg([f"task={t}"]).task for t in group_options("task")}
    for model in NEW_MODELS:
        cfg = compose_cfg([f"model={model}", "model.pretrained=x"])
        family = cfg.model.family
        types = {"classification", "regression", "lm"} if family == "auto" else FAMILY_TASK_TYPES[family]
        fitting = [t for t, task in tasks.items() if task.type in types]
        assert len(fitting) >= 8, model
        for task in fitting:
            cfg.task = tasks[task]
            resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
            assert resolved["model"]["name"] == model and resolved["task"]["name"] == task
    for model in NEW_MODELS:
        code, out, err = run_main([f"model={model}", "task=rt_snippets", "model.pretrained=x", "--cfg", "job"],
                                  tmp_path, monkeypatch, capfd)
        assert code == 0 and f"name: {model}" in out, err


@pytest.mark.slow
def test_a_bfloat16_base_trains_a_float32_adapter_and_head(tmp_path):
    from safetensors.torch import load_file

    metrics = run_in_process([*NEW["tiny_mistral"], *FAST, "model.base_dtype=bfloat16", "train.mixed_precision=bf16"],
                             tmp_path)
    base = load_file(tmp_path / "base_model" / "model.safetensors")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for n, t in base.items() if ".layers." in n} == {torch.bfloat16}
    assert {t.dtype for t in adapter.values()} == {torch.float32} and any("score" in n for n in adapter)
    assert metrics["adapter_bytes"] == 4 * metrics["adapter_params"] and 0 <= metrics["accuracy"] <= 1


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_the_blocks_and_changes_nothing(tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []  # the MLP inside each block (the block's own forward is transformers' checkpointing wrapper)
    forward = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward",
                        lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    counts, losses = {}, {}
    for on in (False, True):
        calls.clear()
        run_dir = tmp_path / str(on)
        run_in_process([*NEW["tiny_llama"], *FAST, f"train.gradient_checkpointing={on}"], run_dir)
        counts[on] = len(calls)
        losses[on] = [json.loads(line).get("train/loss") for line in
                      (run_dir / "metrics_log.jsonl").read_text().splitlines() if "train/loss" in line]
    assert counts[True] == counts[False] + 6 * 2  # each of the 6 steps runs both blocks' forwards again
    assert losses[True] == pytest.approx(losses[False], rel=1e-6) and len(losses[True]) == 2


@pytest.mark.slow
def test_a_four_bit_base_is_refused_without_cuda_and_so_are_weight_gradients(tmp_path, monkeypatch, capfd):
    from lorambo.allocation import check_statistics_fit_the_base, needed_statistics
    from lorambo.methods import build_method

    code, _, err = run_main([*NEW["tiny_deberta_v3"], "model.pretrained=some/model", "model.quantize=4bit",
                             "logger=none"], tmp_path, monkeypatch, capfd)
    assert code != 0 and "model.quantize=4bit needs a CUDA GPU" in err and "Traceback" not in err
    for allocator, refused in (("hessian_offline", True), ("gradient", True), ("data_weighted", False),
                               ("uniform", False)):
        cfg = compose_cfg([*NEW["tiny_llama"], "model.quantize=4bit", f"allocator={allocator}"])
        method = build_method(cfg, [], 1, str(tmp_path), False)
        if refused:
            with pytest.raises(LoramboError, match="4-bit base"):
                check_statistics_fit_the_base(cfg, method, needed_statistics(cfg, method))
        else:
            check_statistics_fit_the_base(cfg, method, needed_statistics(cfg, method))


def test_sharded_training_is_refused_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lorambo.devices import refuse_sharding

    refuse_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(LoramboError, match="sharding is not supported"):
            refuse_sharding(SimpleNamespace(distributed_type=kind))
