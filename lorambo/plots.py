"""PNG plots of a run's ranks (matplotlib, no display)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_ranks(ranks: dict[str, int], order: list[str], path: str, title: str) -> None:
    names = [n for n in order if n in ranks] or list(ranks)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.12 + 2), 3.5))
    ax.bar(range(len(names)), [ranks[n] for n in names], width=0.9)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("rank")
    ax.set_title(title)
    ax.set_xlim(-1, len(names))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_rank_history(history: list[dict], order: list[str], path: str, title: str) -> None:
    """Rank of every layer over training steps (one line per layer), from rank_history.jsonl records."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    for name in order:
        ax.plot(steps, [h["ranks"].get(name, 0) for h in history], drawstyle="steps-post", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("rank")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
