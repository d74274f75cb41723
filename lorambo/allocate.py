"""`lorambo-allocate`: an allocation without training, written for PEFT. The statistics are measured and the
allocator run exactly as `lorambo-run` does before it trains; the ranks and scales go into a PEFT
`adapter_config.json` (a LoraConfig with anchored rank_pattern / alpha_pattern keys and the scale policy), so
that PEFT's own scripts, its method-comparison suite and other trainers can use the allocation."""

import json
import os

from lorambo.allocation import choose_ranks
from lorambo.allocators import peft_start
from lorambo.budget import allocation_cost, resolve_p_max
from lorambo.devices import make_accelerator
from lorambo.errors import LoramboError
from lorambo.methods import build_method
from lorambo.models import adaptable_layers, check_model_fits_task, load_data_and_base, resolve_family
from lorambo.results import write_json_atomic, write_text_atomic
from lorambo.schema import validate


def write_allocation_for_peft(cfg, out_dir: str) -> dict:
    """adapter_config.json, allocation.json and sensitivities.json in `out_dir`; returns the allocation."""
    from accelerate.utils import set_seed


    validate(cfg)
    resolve_family(cfg)
    check_model_fits_task(cfg.model, cfg.task)
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    data, model = load_data_and_base(cfg, out_dir, True)
    layers = adaptable_layers(model, cfg.model.target_modules)
    method = build_method(cfg, layers, 1, out_dir, True)
    p_max = resolve_p_max(cfg.budget, layers)
    if not method.uses_allocator or method.adapter_config(p_max, {layer.name: 1 for layer in layers}) is None:
        raise LoramboError(f"method={method.name} sets its ranks while it trains, so there is no allocation to "
                           f"write before training; use method=lora or method=dora with an offline allocator")
    ranks = choose_ranks(cfg, method, model, layers, p_max, data, accelerator, out_dir)["ranks"]
    config = method.adapter_config(p_max, ranks)
    config.base_model_name_or_path = cfg.model.pretrained
    start = peft_start(cfg.allocator.name, config, cfg.task.type)
    settings = {k: list(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    write_text_atomic(os.path.join(out_dir, "adapter_config.json"), json.dumps(settings, indent=2, sort_keys=True))
    adapter_params = allocation_cost(ranks, layers) + method.fixed_cost()
    path = os.path.join(out_dir, "allocation.json")
    with open(path) as f:
        allocation = json.load(f)
    allocation.update({"adapter_params": adapter_params, "peft_start": start, "model": cfg.model.name,
                       "task": cfg.task.name, "method": method.name, "seed": cfg.seed})
    write_json_atomic(path, allocation)
    return allocation
