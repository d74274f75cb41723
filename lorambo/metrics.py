"""Task metrics from predictions gathered over the evaluation split."""

import math

import numpy as np


def task_metrics(names, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    out = {}
    for name in names:
        if name in ("pearson", "spearman", "pearson_spearman"):  # STS-B; AdaLoRA reports the mean of the two
            x, y = logits.reshape(-1), labels.reshape(-1)
            pearson, spearman = float(pearsonr(x, y)[0]), float(spearmanr(x, y)[0])
            out[name] = {"pearson": pearson, "spearman": spearman,
                         "pearson_spearman": (pearson + spearman) / 2}[name]
            continue
        predictions = logits.argmax(-1)
        if name == "accuracy":
            out[name] = float((predictions == labels).mean())
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(labels, predictions))
        else:
            raise ValueError(f"unknown metric {name}")
    return out


def perplexity(total_loss: float, total_tokens: int) -> dict[str, float]:
    mean = total_loss / max(total_tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}
