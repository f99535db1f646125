"""Padded image batches: a batch of images of different sizes, zero-padded to the largest, with its padding
mask (DETR's NestedTensor), and the mask resized to a feature map."""
from typing import List

import torch


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


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of a boolean [B,H,W] padding mask."""
    return torch.nn.functional.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]
