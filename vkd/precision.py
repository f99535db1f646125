"""Arithmetic that must stay in full fp32 whatever the caller's autocast or TF32 settings: whitening, which
amplifies rounding by up to 1/sqrt(eps), and the orthogonal map, whose products would lose orthogonality."""
import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def full_fp32(device_type: str) -> Iterator[None]:
    """fp32 arithmetic on ``device_type`` whatever the caller chose: autocast off, and float32 matmuls at full
    precision (``torch.set_float32_matmul_precision("high")`` or ``allow_tf32`` would run them in TF32)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)
