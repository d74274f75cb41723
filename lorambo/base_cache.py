"""The cache of bases built once on this machine (pretrained here, lorambo/pretrain.py, or prepared from a package,
lorambo/prepared.py): where it lives, building a folder once across processes, and the sha256 of a base's weights."""

import fcntl
import hashlib
import os


def cache_root() -> str:
    return os.environ.get("LORAMBO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorambo", "bases")


def build_once(folder: str, marker: str, build) -> None:
    """`build()` (which writes `folder` whole, `marker` in it last) unless the folder is there; one process at a
    time: another building the same folder is waited for. A cached base, pretrained or prepared."""
    if os.path.exists(os.path.join(folder, marker)):
        return
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(folder, marker)):
            build()


def weights_sha256(path: str) -> str:
    """The sha256 of a base's weights: one file, or a folder's weight files in name order."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
    digest = hashlib.sha256()
    for name in files:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
