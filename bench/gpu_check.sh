#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): every preset, method, allocator, QLoRA, bf16/fp16 and two processes, a few
# steps each on the real hub models, one line per case. Needs a CUDA GPU, the hub (huggingface-cli login for
# Llama and Mistral), and lorambo installed with its gpu extra: pip install -e '.[gpu]'.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
