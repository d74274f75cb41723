"""Result files and memory accounting."""


def test_peak_memory_is_per_run_not_per_process():
    """Sweep jobs share a process: after a reset, a small job must not report an earlier job's peak."""
    import numpy as np
    import torch

    from lorambo.results import peak_memory_bytes, reset_peak_memory

    cpu = torch.device("cpu")
    big = np.ones(400 * 2**20 // 8)  # 400 MiB touched
    high = peak_memory_bytes(cpu)
    del big
    reset_peak_memory(cpu)
    assert peak_memory_bytes(cpu) < high - 200 * 2**20
