"""Result files and memory accounting."""

import os
import time


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


def test_peak_memory_is_per_run_where_the_kernel_ignores_the_reset(monkeypatch):
    """Some sandboxes accept the write to clear_refs and keep VmHWM: the peak must still be the run's own."""
    import builtins

    import numpy as np
    import torch

    from lorambo import results

    real_open = builtins.open

    def open_ignoring_clear_refs(path, *args, **kwargs):
        if str(path) == "/proc/self/clear_refs":
            return real_open(os.devnull, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_ignoring_clear_refs)
    cpu = torch.device("cpu")
    big = np.ones(400 * 2**20 // 8)
    high = results.peak_memory_bytes(cpu)
    del big
    results.reset_peak_memory(cpu)
    try:
        assert results.peak_memory_bytes(cpu) < high - 200 * 2**20
        again = np.ones(300 * 2**20 // 8)  # a peak after the reset, gone before it is read, is still seen
        time.sleep(0.1)
        del again
        assert results.peak_memory_bytes(cpu) > results._status_kib("VmRSS") * 1024 + 200 * 2**20
    finally:
        monkeypatch.undo()
        results.reset_peak_memory(cpu)
    assert results._sampler is None  # the real kernel resets, so the sampler stops
