"""Can a causal LM copy from its context? Loss on 16 random 30-token sequences, first pass and repeat
(docs/results.md, issue 19). A model that copies predicts the repeat far better than the first pass.

    python docs/tables/llm_track_cpu/copy_check.py ~/.cache/lorambo/bases/small_gpt2_wiki-*/model [MODEL ...]
"""
import sys

import torch
import torch.nn.functional as F

import lorambo  # noqa: F401  (makes torchvision, and so transformers, import on this CPU)
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
first = torch.randint(2000, 8000, (16, 30))
ids = torch.cat([first, first], 1)
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    print(f"{path}: first pass {loss[:, :29].mean():.2f} nats, repeat {loss[:, 30:].mean():.2f}")
