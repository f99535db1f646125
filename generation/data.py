"""Real images for GAN training and FID reference statistics, held in memory as uint8 [N, 3, 32, 32].

The sources are ``vkd.data``'s, shared with classification:
- C10 / C100: torchvision's CIFAR layout (``cifar-10-batches-py/`` or ``cifar-100-python/`` under
  ``--data-path``; ``--download`` has torchvision fetch it there, ``vkd.data.cifar``). FID reference: the test
  split (10k), as KD-DLGAN.
- DIGITS: scikit-learn's 8x8 digits, exported once by ``vkd.data.digits`` (32x32 nearest upscaling, fixed
  stratified 80/20 split). FID reference: the 360 held-out images.
- FASHION: Fashion-MNIST from its four IDX files, read by ``vkd.data.fmnist`` (``--data-path``, default
  Debian's /usr/share/datasets/fashion-mnist, or torchvision's ``FashionMNIST/raw/`` under it). The 28x28
  images are zero-padded to 32x32 (no resampling) and repeated to RGB. FID reference: the 10k test images.

Training fractions follow KD-DLGAN: drawn uniformly without replacement with a fixed seed (0), so
every run and every seed trains on the same images; ``balanced`` draws the fraction from every class
(``vkd.data.subsets``).
"""
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from vkd.data import cifar, digits, fmnist, subsets
from vkd.errors import DatasetError

DATASETS = ("C10", "C100", "DIGITS", "FASHION")
DOWNLOADABLE = ("C10", "C100")
SUBSET_DRAWS = ("uniform", "balanced")
IMAGE_SIZE = 32
FASHION_PAD = 2  # 28 + 2 + 2 = 32


@dataclass
class ImageData:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def _cifar(name: str, root: Optional[str], download: bool) -> ImageData:
    splits = [cifar.load_cifar(root, 10 if name == "C10" else 100, is_train, download=download)
              for is_train in (True, False)]
    tensors = [(torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(split.targets))
               for split in splits]
    return ImageData(*tensors[0], *tensors[1], num_classes=len(splits[0].classes))


def _digits(root: Optional[str]) -> ImageData:
    tensors = []
    for is_train in (True, False):
        images, labels = digits.read_digits(root, is_train)
        tensors += [torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)]
    return ImageData(*tensors, num_classes=digits.DIGITS_CLASSES)


def _fashion(root: Optional[str]) -> ImageData:
    tensors = []
    for is_train in (True, False):
        images, labels = fmnist.read_fmnist(root, is_train)
        images = torch.from_numpy(images.copy())
        images = torch.nn.functional.pad(images, (FASHION_PAD,) * 4).unsqueeze(1).repeat(1, 3, 1, 1)
        tensors += [images, torch.from_numpy(labels.astype(np.int64))]
    return ImageData(*tensors, num_classes=len(fmnist.FMNIST_CLASSES))


def load_image_data(name: str, root: Optional[str], download: bool = False) -> ImageData:
    """``name``'s images under ``root``; ``download``: CIFAR missing there is downloaded first."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name in DOWNLOADABLE:
        return _cifar(name, root, download)
    if name == "DIGITS":
        return _digits(root)
    return _fashion(root)


def subset_indices(labels: torch.Tensor, fraction: float, draw: str = "uniform", seed: int = 0) -> List[int]:
    """The training images kept for ``fraction`` < 1 (KD-DLGAN's ``--num_samples``): sorted indices."""
    if not 0 < fraction <= 1:
        raise DatasetError(f"--data-fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(range(len(labels)))
    if draw == "balanced":
        return subsets.balanced_subset_indices(labels.tolist(), fraction, seed)
    return subsets.uniform_subset_indices(len(labels), fraction, seed)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the generator's tanh range."""
    return images.float() / 127.5 - 1


class RealBatches:
    """An endless stream of real batches: a fresh permutation every epoch, a disjoint share per process.

    Drawn from (seed, epoch) alone, and ``state_dict`` holds the position, so a resumed run reads the
    same batches as an uninterrupted one. Incomplete batches at the end of an epoch are dropped, as
    BigGAN's loader does (drop_last).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, hflip: bool,
                 rank: int = 0, world_size: int = 1):
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.hflip = batch_size, seed, hflip
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(images) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DatasetError(f"{len(images)} training images cannot fill one batch of {batch_size} on "
                               f"{world_size} process(es): lower --batch-size or raise --data-fraction")
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(len(self.images), generator=generator)
        share = self.batches_per_epoch * self.batch_size
        return order[self.rank * share:(self.rank + 1) * share]

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        chosen = self._order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        images = to_model_range(self.images[chosen])
        if self.hflip:
            # The protocol's only augmentation of the data itself (DiffAugment comes later, in the step).
            flip = torch.rand(len(chosen)) < 0.5
            images[flip] = images[flip].flip(-1)
        return images, self.labels[chosen]
