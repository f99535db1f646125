"""Joint image/target transforms of DETR/ViDT, on PIL images and xyxy boxes.

ViDT's resize floors both output sides to a multiple of 16; that quirk is kept.
"""
import random
from typing import Optional, Sequence, Tuple

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from vidt.util.box_ops import box_xyxy_to_cxcywh

SIZE_MULTIPLE = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_shape(width: int, height: int, size: int, max_size: Optional[int]) -> Tuple[int, int]:
    """(h, w) with the short side at ``size`` (reduced so the long side stays <= max_size), both floored to x16."""
    if max_size is not None:
        short, long = min(width, height), max(width, height)
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        new_h, new_w = height, width
    elif width < height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_h, new_w = size, int(size * width / height)
    return new_h - new_h % SIZE_MULTIPLE, new_w - new_w % SIZE_MULTIPLE


def resize(image, target, size: int, max_size: Optional[int]):
    new_h, new_w = resized_shape(image.width, image.height, size, max_size)
    ratio_w, ratio_h = new_w / image.width, new_h / image.height
    image = F.resize(image, [new_h, new_w])
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([new_h, new_w])
    return image, target


def crop(image, target, top: int, left: int, height: int, width: int):
    image = F.crop(image, top, left, height, width)
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    boxes = target["boxes"] - torch.as_tensor([left, top, left, top])
    boxes = torch.min(boxes.reshape(-1, 2, 2), torch.as_tensor([width, height], dtype=torch.float32)).clamp(min=0)
    keep = torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)
    target["boxes"] = boxes.reshape(-1, 4)
    target["area"] = (boxes[:, 1, :] - boxes[:, 0, :]).prod(dim=1)
    for field in ("boxes", "labels", "area", "iscrowd"):
        target[field] = target[field][keep]
    return image, target


def hflip(image, target):
    image = F.hflip(image)
    target = dict(target)
    boxes = target["boxes"]
    flipped = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1])
    target["boxes"] = flipped + torch.as_tensor([image.width, 0, image.width, 0])
    return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        return hflip(image, target) if random.random() < self.p else (image, target)


class RandomResize:
    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop of random width/height in [min_size, max_size] (bounded by the image) at a random place."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        # The lower bound is capped by the image so small images cannot make randint fail.
        width = random.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        height = random.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top, left, h, w = T.RandomCrop.get_params(image, [height, width])
        return crop(image, target, top, left, h, w)


class RandomSelect:
    """Apply ``first`` with probability p, else ``second``."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        return self.first(image, target) if random.random() < self.p else self.second(image, target)


class ToTensor:
    def __call__(self, image, target):
        return F.to_tensor(image), target


class Normalize:
    """ImageNet normalisation; boxes become (cx, cy, w, h) relative to the (transformed) image."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image, target):
        image = F.normalize(image, mean=self.mean, std=self.std)
        target = dict(target)
        h, w = image.shape[-2:]
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


def scaled(value: int, scale: float) -> int:
    return max(SIZE_MULTIPLE, int(round(value * scale)))


def make_coco_transforms(image_set: str, train_sizes: Sequence[int], max_size: int, eval_size: int):
    """ViDT's COCO pipelines. The crop branch's fixed sizes (400/500/600, crop 384-600) are scaled by
    max(train_sizes)/800 and validation keeps training's long/short cap, so the defaults reproduce the
    original exactly and small-image runs stay valid."""
    normalize = Compose([ToTensor(), Normalize()])
    if image_set == "train":
        scale = max(train_sizes) / 800
        crop_branch = Compose([
            RandomResize([scaled(s, scale) for s in (400, 500, 600)]),
            RandomSizeCrop(scaled(384, scale), scaled(600, scale)),
            RandomResize(train_sizes, max_size=max_size),
        ])
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(RandomResize(train_sizes, max_size=max_size), crop_branch),
            normalize,
        ])
    if image_set == "val":
        # The original caps validation at eval_size*1333//800: training's long/short ratio.
        return Compose([RandomResize([eval_size], max_size=eval_size * max_size // max(train_sizes)), normalize])
    raise ValueError(f"unknown image set '{image_set}' (train or val)")
