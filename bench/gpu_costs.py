"""GPU-hours of each GPU preset on one 80 GB A100, on paper: published step times of models of the same sizes,
scaled to the preset's data, rows and seeds. Prints the README's cost table. Nothing here was run on a GPU.

Published anchors (each a measured training time someone published):
- transformers' examples/pytorch/text-classification/README.md: bert-base-cased fine-tuned with run_glue.py,
  batch 32, max length 128, 3 epochs (MRPC 5), fp16 on one Titan RTX: MNLI 1:17:06, QQP 1:11:54, QNLI 20:16,
  SST-2 13:11, CoLA 1:41, STS-B 1:08, MRPC 1:10, RTE 0:29.
- PEFT's method_comparison/MetaMathQA/results (one L40S): Llama-3.2-3B, 5,000 steps of batch 4: LoRA r32 942 s
  of training for 4,198,051 tokens, 1,153 s in all, 22.3 GB peak; DoRA 1,471 s in all, 24.5 GB; AdaLoRA 1,441 s,
  22.8 GB.
- NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README: one A100 80GB, mixed precision, batch 256:
  2,470 images/s of training.
Assumptions (stated so they can be replaced by a measurement from bench/gpu_check.sh): an A100 is 2.4x a Titan
RTX (their dense fp16 tensor peaks, 312 and 130 TFLOPS) and as fast as an L40S at these batch sizes; a LoRA step
costs what a full fine-tuning step does (the backward through the frozen base remains: an upper bound); batch 16
costs 1.25x batch 32 per example; RoBERTa-base 1x BERT-base, T5-base 2x, DeBERTa-v3-base 1.8x; GPT-2 (124M)
reaches half the parameter-tokens per second of PEFT's 3B run; ResNet-50 at batch 16 a third of its batch-256
rate.
"""

GLUE_TRAIN = {"mnli": 392_702, "qqp": 363_846, "qnli": 104_743, "sst2": 67_349, "cola": 8_551, "stsb": 5_749,
              "mrpc": 3_668, "rte": 2_490}
TITAN_FP16_SECONDS = {"mnli": 4626, "qqp": 4314, "qnli": 1216, "sst2": 791, "cola": 101, "stsb": 68, "mrpc": 70,
                      "rte": 29}
TITAN_EPOCHS = {task: 5 if task == "mrpc" else 3 for task in GLUE_TRAIN}
A100_OVER_TITAN = 312 / 130
BATCH16 = 1.25
ENCODER = {"bert": 1.0, "roberta": 1.0, "t5": 2.0, "deberta_v3": 1.8}
ADALORA_EPOCHS = {"mnli": 7, "qqp": 5, "qnli": 5, "sst2": 24, "cola": 25, "stsb": 25, "mrpc": 30, "rte": 50}
PEFT_3B = {"seconds": {"lora": 1153, "dora": 1471, "adalora": 1441}, "train_seconds": 942, "tokens": 4_198_051,
           "params": 3.21e9, "peak_gb": {"lora": 22.3, "dora": 24.5, "adalora": 22.8}}
WIKITEXT103_TOKENS = 117_900_000  # GPT-2 BPE tokens of its training split (about 103M words)
IMAGENET_TRAIN, RESNET50_A100 = 1_281_167, 2470


def glue_epoch_seconds(task: str, model: str, batch: int) -> float:
    """One epoch of `task` on one A100 for a base-size encoder."""
    per_epoch = TITAN_FP16_SECONDS[task] / TITAN_EPOCHS[task] / A100_OVER_TITAN
    return per_epoch * ENCODER[model] * (BATCH16 if batch == 16 else 1.0)


def presets() -> list[tuple[str, float, str, str]]:
    """(preset, GPU-hours, peak memory per cell, cells that fit one 80 GB GPU)."""
    rows = []
    table1 = sum(glue_epoch_seconds(t, m, 16) for m in ("bert", "roberta", "t5") for t in ("mnli", "qnli", "sst2"))
    rows.append(("table1", table1 * 4 * 3 / 3600, "2-5 GB (T5 full FT ~8 GB)", "8 (small models leave a GPU idle: "
                 "2-4 side by side raise throughput)"))
    arg = sum(glue_epoch_seconds(t, "roberta", 16) for t in GLUE_TRAIN)
    rows.append(("adarankgrad_glue", arg * 7 * 3 / 3600, "2-5 GB", "8"))
    adalora = sum(glue_epoch_seconds(t, "deberta_v3", 32) * ADALORA_EPOCHS[t] for t in GLUE_TRAIN)
    rows.append(("adalora_glue", adalora * 10 * 5 / 3600, "4-12 GB (batch 32 x up to 512)", "6"))
    gpt2_rate = PEFT_3B["tokens"] / PEFT_3B["train_seconds"] * PEFT_3B["params"] / 124e6 / 2
    rows.append(("table2_lm", WIKITEXT103_TOKENS / gpt2_rate * 42 / 3600, "~10 GB (batch 16 x 512, 50k-token logits)",
                 "6"))
    rows.append(("table2_vision", IMAGENET_TRAIN / (RESNET50_A100 / 3) * 36 / 3600, "~4 GB (batch 16)",
                 "8 (JPEG decoding: 8 loader workers each need the cores)"))
    llm = sum(PEFT_3B["seconds"].get(row, PEFT_3B["seconds"]["lora"]) for row in
              ("uniform", "frobenius_greedy", "hessian_offline", "hessian_online", "data_weighted", "eva", "gora",
               "dora", "adalora"))
    rows.append(("llm_method_comparison", llm / 3600, "22-25 GB (PEFT's measured peaks)", "3"))
    per_cell = glue_epoch_seconds("sst2", "bert", 16)
    rows.append(("budget_sweep", per_cell * 96 / 3600, "as the model's (BERT-base on SST-2 here)", "8"))
    return rows


def main() -> None:
    print("| preset | GPU-hours on one A100 80GB (on paper) | peak memory per cell | cells per GPU |")
    print("|---|---|---|---|")
    for preset, hours, memory, cells in presets():
        print(f"| `{preset}` | {hours:.0f} | {memory} | {cells} |")


if __name__ == "__main__":
    main()
