"""Seeds, thread counts and deterministic kernels: what makes a run repeatable, and resumable exactly."""
import os
import random
from typing import Optional

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


def configure_determinism(deterministic: bool, threads: Optional[int]) -> None:
    """Fixed thread count and deterministic kernels. Floating-point sums depend on how work is split
    across threads, and some kernels (CUDA atomics, cuBLAS workspaces) on scheduling."""
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at CUDA's first use
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
