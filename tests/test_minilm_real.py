"""The real offline default: pretrained MiniLM-L6 on the real Rotten Tomatoes snippets learns."""

from tests.helpers import run_in_process


def test_pretrained_minilm_learns_sentiment(tmp_path):
    # 100 steps of batch 16 on 1,600 training snippets, 400 held-out ones (about a minute on 2 cores)
    metrics = run_in_process(["task.max_train_samples=1600", "task.max_eval_samples=400", "train.max_steps=100"],
                             tmp_path / "minilm")
    assert metrics["model"] == "minilm" and metrics["task"] == "rt_snippets"
    # the validation set is balanced (about 50% each class): chance is 0.5, a constant guess at most ~0.55
    assert metrics["accuracy"] > 0.7, metrics["accuracy"]
