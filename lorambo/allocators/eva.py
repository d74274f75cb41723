"""EVA, explained variance adaptation (Paischer et al., arXiv 2410.07170), at a parameter budget.

The statistic is PEFT's own (`peft.tuners.lora.eva.get_eva_state_dict`, through sensitivity.explained_variance):
each layer's input tokens, padding left out, go through an incremental PCA until the leading right-singular
directions stop moving; a direction's explained-variance ratio is its worth. PEFT then takes the top
`rank_budget` ratios over all layers, a budget counted in ranks. Here the budget counts parameters: directions
are taken in the same order, each paid at its layer's true cost c_i = d_in + d_out, until P_max is spent.
A is then set to the chosen directions (B stays zero), as PEFT's `init_lora_weights="eva"` does."""

from lorambo.adapters import ADAPTER, lora_layers
from lorambo.allocators import register


def start_from_input_directions(peft_model, stats: dict) -> None:
    """Each layer's A: its input's leading principal directions, as many as its rank (PEFT's EVA start)."""
    for name, layer in lora_layers(peft_model).items():
        A = layer.lora_A[ADAPTER].weight
        directions = stats["input_components"][name][: A.shape[0]]
        A.data.copy_(directions.reshape(A.shape).to(A.dtype))


def eva_in_peft(config, task_type: str) -> str:
    """PEFT's own EVA start at these ranks: rho 1 caps every layer at its rank and the rank budget is their sum,
    so PEFT's redistribution gives each layer exactly its rank; the scales stay the allocation's."""
    from peft import EvaConfig

    config.init_lora_weights = "eva"
    # PEFT's label mask is for token labels (a causal LM); a classifier's labels are one per example
    config.eva_config = EvaConfig(rho=1.0, adjust_scaling_factors=False, use_label_mask=task_type == "lm")
    return ("EVA: init_lora_weights='eva' with rho=1 (each layer keeps its rank); call "
            "peft.initialize_lora_eva_weights(model, dataloader) after get_peft_model")


@register("eva", required_stats=lambda **_: {"explained_variance"}, initialise=start_from_input_directions,
          peft_start=eva_in_peft)
def eva_ranks(layers, p_max, stats, **_) -> dict[str, int]:
    """Directions in decreasing explained-variance ratio over every layer; one whose layer no longer fits in
    the budget is passed over (a cheaper layer's may still fit), and a layer's k-th direction only after its
    first k-1. A layer gets at most the directions measured: rho x the uniform rank (PEFT's cap rho * r)."""
    ratios = stats["explained_variance"]
    order = sorted(((-float(v), i, k) for i, layer in enumerate(layers) for k, v in enumerate(ratios[layer.name])))
    ranks, spent = {layer.name: 0 for layer in layers}, 0
    for _, i, k in order:
        layer = layers[i]
        if ranks[layer.name] == k and k < layer.max_rank and spent + layer.cost <= p_max:
            ranks[layer.name] += 1
            spent += layer.cost
    return ranks
