"""Classification's start-up: this process's rank, world size and device, and what depends on the device (the
mixed precision, pinned memory). The machinery is in ``vkd.distributed``."""
import dataclasses

import torch

from vkd.distributed import Runtime, start_processes
from vkd.errors import BadInput
from vkd.reproducibility import configure_cuda_kernels, configure_determinism


def init_runtime(args, explicit) -> Runtime:
    """Classification's set-up: the rank, world size and device of this process (joining the process group
    when there are several), the thread count and determinism flags.

    The runtime holds what depends on the device: the mixed precision (``--amp``, by default fp16 on cuda and
    none on cpu) and whether loaders pin memory (``--pin-mem``, on a GPU only).
    """
    configure_determinism(args.deterministic, args.threads)
    configure_cuda_kernels(fixed_shapes=True, deterministic=args.deterministic)
    runtime = start_processes(args.device, args.local_rank, args.dist_url, args.dist_timeout,
                              world_size_flag=args.world_size if "world_size" in explicit else None)
    device = runtime.device
    amp = args.amp or ("fp16" if device.type == "cuda" else "none")
    # Pinning only helps host-to-GPU copies (and warns without a GPU).
    runtime = dataclasses.replace(runtime, amp=amp, pin_memory=args.pin_mem and device.type == "cuda")
    if amp == "fp16" and device.type != "cuda":
        raise BadInput("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on the CPU")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise BadInput(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bf16 kernels (they need compute "
                       f"capability 8.0 or newer); use --amp fp16")
    if args.teacher_cache and device.type == "cuda":
        # The key is a SHA-256 of each input batch on the host: about 0.84 s for 512 images at 224 px on one
        # core, several times a GPU teacher's forward (benchmarks/gpu_check.py measures both).
        raise BadInput("--teacher-cache hashes every input batch on the host, which costs more than a GPU teacher's "
                       "forward: drop it on a GPU (it serves CPU runs)")
    return runtime
