"""Seeds, thread counts and deterministic kernels: what makes a run repeatable, and resumable exactly."""
import contextlib
import os
import random
from typing import Iterator, Optional

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Augmentation and mixup randomness of an epoch depend on (seed, rank, epoch) alone, so a resumed
    # run draws the same random numbers as an uninterrupted one.
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


# Sets the model's stream apart from epoch_seed's (seed, rank, epoch) ones.
MODEL_STREAM = 0x6D6F64656C


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([MODEL_STREAM, seed, rank, step]).generate_state(1)[0])


@contextlib.contextmanager
def model_random_stream(seed: int, rank: int, step: int, device: torch.device) -> Iterator[None]:
    """Within it, torch draws from a stream seeded by (seed, rank, global step) and the global one is left as it
    was. A student's dropout and drop-path then cannot shift the augmentation and mixup draws, so students of
    one seed see the same batches; the stream needs no state to resume mid-epoch. A model that draws nothing
    computes exactly what it computed outside."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(step_seed(seed, rank, step))
        yield


def configure_determinism(deterministic: bool, threads: Optional[int]) -> None:
    """Fixed thread count and deterministic kernels. Floating-point sums depend on how work is split
    across threads, and some kernels (CUDA atomics, cuBLAS workspaces) on scheduling."""
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at CUDA's first use
        torch.use_deterministic_algorithms(True)


def configure_cuda_kernels(fixed_shapes: bool, deterministic: bool = False) -> None:
    """The kernel choices torch leaves implicit, made on purpose (they only matter on a GPU).

    cuDNN autotunes convolutions when every batch has one shape (classification, generation: the tuning is per
    shape, so not for detection's padded batches), but not with deterministic kernels: it picks among kernels
    whose results differ in the last bits. float32 matmuls stay in full fp32, not TF32: under AMP the networks'
    matmuls run in fp16 or bf16 anyway, and what runs in fp32 (the orthogonal map, whitening, the losses) does
    so for its precision. Convolutions keep torch's default (TF32 allowed): they are the frozen teacher's and
    the students' stems, which AMP runs in half precision too.
    """
    torch.backends.cudnn.benchmark = fixed_shapes and not deterministic
    torch.set_float32_matmul_precision("highest")
