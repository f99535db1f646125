"""Padded image batches and the few torch.distributed helpers the training loop needs."""
import sys
from typing import List

import torch
import torch.distributed as dist


class NestedTensor:
    """A zero-padded image batch [B,3,H,W] with its padding mask [B,H,W] (True = padding)."""

    def __init__(self, tensors: torch.Tensor, mask: torch.Tensor):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking),
                            self.mask.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "NestedTensor":
        """What a DataLoader with pin_memory=True calls on a batch element it does not know."""
        return NestedTensor(self.tensors.pin_memory(), self.mask.pin_memory())


def nested_tensor_from_images(images: List[torch.Tensor]) -> NestedTensor:
    """Pad to the per-batch maximum height and width (no extra multiple-of-32 padding, as ViDT)."""
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    batch = images[0].new_zeros((len(images), images[0].shape[0], max_h, max_w))
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=images[0].device)
    for img, padded, pad_mask in zip(images, batch, mask):
        padded[:, :img.shape[1], :img.shape[2]].copy_(img)
        pad_mask[:img.shape[1], :img.shape[2]] = False
    return NestedTensor(batch, mask)


def collate_fn(batch):
    images, targets = zip(*batch)
    return nested_tensor_from_images(list(images)), list(targets)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def reduce_dict(values: dict, average: bool = True) -> dict:
    """All-reduce a dict of scalar tensors (same keys on every process) for logging."""
    world_size = get_world_size()
    if world_size < 2:
        return values
    with torch.no_grad():
        names = sorted(values)
        stacked = torch.stack([values[k] for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world_size
        return dict(zip(names, stacked))


def setup_for_distributed_printing(is_master: bool) -> None:
    """Silence print() on every process but rank 0 (force=True still prints). Prints to stderr pass: an
    error line of any rank must reach the terminal."""
    import builtins
    builtin_print = builtins.print

    def rank_aware_print(*args, **kwargs):
        if kwargs.pop("force", False) or is_master or kwargs.get("file") is sys.stderr:
            builtin_print(*args, **kwargs)

    builtins.print = rank_aware_print


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of a boolean [B,H,W] padding mask."""
    return torch.nn.functional.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
