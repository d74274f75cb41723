"""Result files: written whole or not at all."""

import functools
import importlib.metadata
import json
import os
import resource
import tempfile
import threading

import torch


def write_atomic(path, write, binary: bool = False) -> None:
    """`write(f)` into a temporary file in the same folder, flushed to disk, then renamed over `path`: a reader
    (or a resumed run) never sees half a file, whatever kills the writer. The one atomic writer."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone who can read the folder
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def append_jsonl(path, record: dict) -> None:
    """One record as one line (metrics_log.jsonl, rank_history.jsonl): the one JSONL writer."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list[dict]:
    """Every record of a JSONL file: the one JSONL reader."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# the libraries whose versions change a run's numbers (constraints.txt pins them; metrics.json records them)
NUMERIC_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "timm", "numpy")


def library_versions() -> dict:
    return {name: importlib.metadata.version(name) for name in NUMERIC_LIBRARIES}


@functools.cache
def source_revision() -> dict:
    """The commit of the lorambo tree the run came from, and whether that tree had uncommitted changes to
    tracked files (null for an installed wheel, which has no tree)."""
    import subprocess

    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = lambda *args: subprocess.run(["git", "-C", tree, *args], capture_output=True, text=True, timeout=10,
                                           check=True).stdout.strip()
        if git("rev-parse", "--show-toplevel") != tree:
            raise ValueError("lorambo is not the root of this git tree")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain",
                                                                         "--untracked-files=no"))}
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def hub_revisions(model, task_cfg) -> dict:
    """What was loaded from the hub, by commit: the base model's (transformers records the commit it resolved
    in its config) and each hub dataset's, asked of the hub (null offline, or for a local folder)."""
    config = getattr(model, "config", None)
    return {"model": getattr(config, "_commit_hash", None),
            "datasets": {path: dataset_revision(path) for path in hub_dataset_paths(task_cfg)}}


def hub_dataset_paths(task_cfg) -> list[str]:
    """Every `dataset.path` a task (and its forgetting text) reads, whichever form its `dataset` takes."""
    from omegaconf import OmegaConf

    found = []

    def visit(node):
        if isinstance(node, dict):
            if isinstance(node.get("dataset"), dict):
                spec = node["dataset"]
                specs = [spec] if "path" in spec else [v for v in spec.values() if isinstance(v, dict)]
                found.extend(str(s["path"]) for s in specs if s.get("path"))
            for value in node.values():
                visit(value)

    visit(OmegaConf.to_container(task_cfg, resolve=True) if not isinstance(task_cfg, dict) else task_cfg)
    return sorted(set(found))


def dataset_revision(path: str) -> str | None:
    offline = "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
    if os.path.exists(path) or offline:
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(path).sha
    except Exception:  # no network, no such repository: the run does not fail for its record
        return None


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor held in the optimizer's state."""
    return sum(t.numel() * t.element_size()
               for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))


def _status_kib(field: str):
    """One `Vm*` line of /proc/self/status in KiB, or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _RssSampler(threading.Thread):
    """The highest VmRSS seen every 10 ms: the peak where the kernel will not reset VmHWM (some sandboxes
    accept the write to clear_refs and ignore it). It can miss a spike shorter than its period."""

    def __init__(self):
        super().__init__(daemon=True, name="lorambo-rss-sampler")
        self.peak_kib = _status_kib("VmRSS") or 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(0.01):
            self.peak_kib = max(self.peak_kib, _status_kib("VmRSS") or 0)


_sampler = None


def _clear_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS. True when it did."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 16 * 1024  # within 16 MiB of now: reset


def reset_peak_memory(device) -> None:
    """Start a new peak: a Hydra sweep runs its jobs in one process, and each must report its own."""
    global _sampler
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    if _sampler is not None:
        _sampler.stopped.set()
        _sampler = None
    if not _clear_peak_rss() and _status_kib("VmRSS") is not None:
        _sampler = _RssSampler()
        _sampler.start()


def peak_memory_bytes(device) -> int:
    """CUDA max allocated on GPU; peak resident set size of this process on CPU since reset_peak_memory
    (VmHWM, or the sampled peak where the kernel keeps VmHWM; where /proc is missing, the whole process's
    peak from getrusage)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if _sampler is not None:
        return max(_sampler.peak_kib, _status_kib("VmRSS") or 0) * 1024
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class RunLog:
    """metrics_log.jsonl (main process) and the tracker, one record per call."""

    def __init__(self, accelerator, path: str):
        self.accelerator, self.path = accelerator, path

    def __call__(self, record: dict, step: int) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.path, {"step": step, **record})
        self.accelerator.log(record, step=step)
