"""A stand-in accelerator on a CPU-only machine: tensors that live "on a device" the way CUDA tensors do.

CUDA's rules that a CPU run never exercises: `.numpy()` of a device tensor raises; an op that mixes a device
tensor with a host tensor (other than a 0-dim scalar) raises; `.item()`, `.tolist()` and `.cpu()` copy to the
host. Inside `simulated_device()`, a tensor moved to (or created on) the device `SIMULATED` is an `OnDevice`: a
wrapper subclass whose values live in an ordinary CPU tensor (so every number is what the CPU computes) but
whose `.device` is not the CPU's, and a dispatch mode that sees every aten op enforces those rules. Autograd,
optimizers, PEFT and accelerate run on it unchanged (it is how DTensor and FakeTensor work).

`SIMULATED` is PyTorch's `meta` device, the only device besides the CPU that a CPU build of torch can place a
tensor on (a PrivateUse1 device needs a C++ device guard); here it carries real values. A real meta tensor
(one made outside the mode, which has no values) reaching an op is refused, so nothing slips through silently.
What this cannot check: CUDA kernels, memory, streams, NCCL,
bitsandbytes, and anything under `if torch.cuda.is_available()` (bench/gpu_check.sh runs those on a GPU).
"""

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SIMULATED = torch.device("meta")


class HostReadError(RuntimeError):
    """What CUDA raises: a device tensor read as host memory, or mixed with host tensors in one op."""


class OnDevice(torch.Tensor):
    """A tensor on the simulated device; its values are `self.elem`, a plain CPU tensor."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            device=SIMULATED, requires_grad=elem.requires_grad, layout=elem.layout)
        out.elem = elem
        return out

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    def numpy(self, *args, **kwargs):  # CUDA: "can't convert cuda:0 device type tensor to numpy"
        raise HostReadError("can't convert a device tensor to numpy; use Tensor.cpu() to copy it to the host first")

    def tolist(self):  # CUDA copies to the host
        return self.elem.tolist()

    # x[[True, False, ...]]: Python builds the index tensor in C++ on x's device, outside the mode; CUDA takes a
    # host index, so it is built on the host here
    def __getitem__(self, index):
        return super().__getitem__(_host_index(index))

    def __setitem__(self, index, value):
        return super().__setitem__(_host_index(index), value)

    def __reduce_ex__(self, protocol):  # torch.save: what a CUDA tensor saved and loaded with map_location=cpu is
        return self.elem.__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # the mode below handles every op


INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
            torch.ops.aten._index_put_impl_.default}


def _is_simulated(device) -> bool:
    return device is not None and torch.device(device).type == SIMULATED.type


def _host_index(index):
    """Sequences in an index (lists, ranges) as host tensors, which is what CUDA indexing takes."""
    as_tensor = lambda i: torch.tensor(list(i)) if isinstance(i, (list, range)) else i
    return tuple(map(as_tensor, index)) if isinstance(index, tuple) else as_tensor(index)


def _empty_on_device(x):
    """An empty tensor made on the device outside the mode holds no values to lose: the simulated one."""
    if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) and x.device.type == SIMULATED.type:
        return OnDevice(torch.empty(x.shape, dtype=x.dtype))
    return x


def _unwrap(x):
    return x.elem if isinstance(x, OnDevice) else x


# An aten op's arguments and results are values, lists and tuples of them, nothing deeper: walked here without
# torch's general pytree, whose per-op cost (every op of a run passes through the mode) was most of the mode's
def tree_leaves(tree):
    if isinstance(tree, dict):
        tree = tuple(tree.values())
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in tree_leaves(item)]
    return [tree]


def tree_map(fn, tree):
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, item) for item in tree)
    return fn(tree)


def _wrap(x):
    return OnDevice(x) if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) else x


class DeviceDiscipline(TorchDispatchMode):
    """Every aten op: moves to and from the simulated device, factories on it, and CUDA's same-device rule."""

    def __init__(self):
        super().__init__()
        self.cross_device_ops: list[str] = []
        self.device_ops = 0  # ops with a device tensor in them: a run that never reached the device has none

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if any(isinstance(t, torch.Tensor) and t.device.type == SIMULATED.type and not isinstance(t, OnDevice)
               and t.numel() for t in tree_leaves((args, kwargs))):
            raise RuntimeError(f"{func}: a tensor was made on {SIMULATED.type} outside the simulation (no values); "
                               f"route its constructor through the mode (see host_then_device)")
        args, kwargs = tree_map(_empty_on_device, (args, kwargs))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(isinstance(t, OnDevice) for t in tensors)
        target = kwargs.get("device")
        self.device_ops += on_device
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout):
            source = args[0]
            kwargs.pop("device", None)
            out = func(_unwrap(source), *args[1:], **kwargs)
            if target is not None and not _is_simulated(target):
                return out  # .cpu() / .to("cpu"): a host copy
            return OnDevice(out) if _is_simulated(target) or isinstance(source, OnDevice) else out
        checked = tensors
        if func in INDEXING:  # CUDA takes host index tensors (x_cuda[cpu_mask]); the values must be on the device
            indices = {id(t) for t in tree_leaves(args[1]) if isinstance(t, torch.Tensor)}
            checked = [t for t in tensors if id(t) not in indices]
        host = [t for t in checked if not isinstance(t, OnDevice) and t.dim() > 0]
        if on_device and host and func not in (torch.ops.aten.copy_.default, torch.ops.aten.set_.source_Tensor):
            message = (f"{func}: a device tensor and {len(host)} host tensor(s) of shape "
                       f"{', '.join(str(tuple(t.shape)) for t in host)} in one op")
            self.cross_device_ops.append(message)
            raise HostReadError("Expected all tensors to be on the same device; " + message)
        if _is_simulated(target):
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is torch.ops.aten.copy_.default:  # in place: the destination keeps its device
            return args[0]
        if on_device or _is_simulated(target):
            return tree_map(_wrap, out)
        return out


def host_then_device(make):
    """torch.tensor(data, device=D) builds on the host and copies in C++, outside Python dispatch: built on the
    host here, then moved through the mode, as CUDA's copy would."""
    def build(*args, device=None, **kwargs):
        if _is_simulated(device):
            return make(*args, **kwargs).to(device)
        return make(*args, device=device, **kwargs)
    return build


@contextmanager
def simulated_device():
    """Inside: `.to(SIMULATED)` puts a tensor on the simulated device, with CUDA's rules enforced."""
    mode = DeviceDiscipline()
    originals = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
    for name, make in originals.items():
        setattr(torch, name, host_then_device(make))
    # module.to(device) on CUDA keeps every Parameter object (param.data is swapped), so hooks and optimizers
    # holding one see it moved; a wrapper subclass needs swap_tensors for the same identity
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with mode:
            yield mode
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
        for name, make in originals.items():
            setattr(torch, name, make)


def on_device(tensor) -> bool:
    return isinstance(tensor, OnDevice)
