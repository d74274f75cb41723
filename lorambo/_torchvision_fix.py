"""Make torchvision importable on CPU torch (see ../shared/METHODS.md section 5).

torchvision's PyPI wheel is CUDA-built: its _C.so fails to load on the CPU build of torch, and the
import then dies on the missing `torchvision::nms` schema, which breaks timm, transformers and peft.
Defining the two op schemas first lets it import; nothing in lorambo calls nms.
"""

import glob
import importlib.util
import os

import torch

_library = None  # kept alive: the schemas live as long as this object


def ensure_torchvision_importable() -> None:
    global _library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _library is not None or not spec.submodule_search_locations:
        return
    shared = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    if not shared:
        return
    try:
        torch.ops.load_library(shared[0])
    except OSError:
        _library = torch.library.Library("torchvision", "DEF")
        _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
