"""The run's devices and processes: accelerate's Accelerator as lorambo configures it, the precision it trains
in, and how many threads torch may use."""

import os

import torch


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    set_threads(cfg.train.get("threads"))
    # accelerate keeps one state per process and refuses a second precision: a process that runs several cells
    # (a parallel sweep's reused workers, the tests) starts each run from a clean state, process group kept
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.logger.name == "none" else "wandb",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_backend=cfg.train.compile_backend if cfg.train.get("compile") else None,
        # several processes without GPUs (torchrun on CPUs): accelerate runs them data-parallel on gloo only
        # when told they are CPU processes; otherwise each would train alone
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
    )
    refuse_sharding(accelerator)
    return accelerator


def refuse_sharding(accelerator) -> None:
    """FSDP and DeepSpeed shard the base across processes; lorambo's statistics read whole weights and their
    gradients on one process, and growth changes parameter shapes mid-run, which sharded flat parameters cannot
    take: refused in one line until both are done under sharding (README, "Any Hugging Face model")."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        from lorambo.errors import LoramboError

        raise LoramboError(f"{accelerator.distributed_type.value} sharding is not supported: the statistics and "
                           f"growth need whole weights on each process; use model.quantize=4bit and "
                           f"model.base_dtype=bfloat16 to fit one GPU, or plain data parallelism")


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX-512 BF16). torch's own probes are
    private (torch.cpu._is_*_supported), so a torch without them reads the kernel's CPU flags instead."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(probe is not None for probe in probes):
        return any(probe() for probe in probes)
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_mixed_precision(setting: str) -> str:
    """auto: bf16 autocast where the hardware has bf16 arithmetic (a GPU that has it, or a CPU with AMX or
    AVX-512 BF16; measured on the offline default in docs/results.md: faster at the same accuracy); else fp16
    with loss scaling on a GPU, float32 on a CPU. Weights, adapter and optimizer state stay float32 either way: autocast only runs the matmuls of
    the training step's forward (and so its backward) in bf16; evaluation is float32 (see `prepare`)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():  # a GPU without bf16 units: fp16, which accelerate runs with a GradScaler
        return "bf16" if cuda_has_bf16() else "fp16"
    return "bf16" if cpu_has_bf16() else "no"


def cuda_has_bf16() -> bool:
    """Whether the GPU has bf16 arithmetic in hardware (Ampere and newer). torch.cuda.is_bf16_supported() says
    True on older GPUs too, where bf16 is emulated (slowly, and not by the tensor cores)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def machine_cores() -> int:
    """The cores this process may run on (its affinity, which a cluster job or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """All the process's cores for one run; in a sweep whose cells run side by side (hydra/launcher=parallel),
    cores / cells, so that the cells' threads add up to the machine's cores (torch starts one thread per core
    in every process: two or three full-width processes on 2 cores made each step ~20x slower)."""
    cells = 1
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            cells = int(HydraConfig.get().launcher.get("n_jobs") or 1)
            if cells < 0:  # joblib's convention: -1 all cores, -2 all but one, ...
                cells = max(1, machine_cores() + 1 + cells)
    except (ImportError, ValueError, AttributeError):
        pass
    return max(1, machine_cores() // max(1, cells))


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads for this process: `train.threads`, or `default_threads()` when null."""
    n = threads or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def unwrap(accelerator, model):
    """The model itself, without DDP's or torch.compile's wrapper: the module whose parameters and names a
    method reads and changes (a compiled wrapper keeps calling this same module, and recompiles when a method
    changes its shapes)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def prepare(accelerator, model, *others):
    """accelerator.prepare(model, *others) (device, DDP, torch.compile, loaders, optimizer, schedule) without
    the autocast accelerate wraps around the model's forward: lorambo autocasts the training forward itself
    (`accelerator.autocast()` in train_step), so evaluation and statistics run in float32 on the same model,
    and no output is cast back to float32 (accelerate's wrapper converts every output, a causal LM's logits
    over its whole vocabulary included: a tiny GPT-2 bf16 step took 1.2x plain PEFT's, `make bench`)."""
    prepared = accelerator.prepare(model, *others)
    inner = unwrap(accelerator, prepared[0] if others else prepared)
    original = inner.__dict__.pop("_original_forward", None)  # where accelerate keeps the forward it wrapped
    if original is not None:
        inner.forward = original
    return prepared
