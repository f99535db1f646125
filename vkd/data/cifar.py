"""CIFAR-10 and CIFAR-100 in torchvision's layout (the python version), never downloaded."""
import os
from typing import Callable, Optional

from torchvision.datasets import CIFAR10, CIFAR100

from vkd.errors import DatasetError

CIFAR_VERSIONS = {10: (CIFAR10, "cifar-10-batches-py"), 100: (CIFAR100, "cifar-100-python")}


def load_cifar(root: Optional[str], num_classes: int, is_train: bool, transform: Optional[Callable] = None) -> CIFAR10:
    """The train or test split of CIFAR-``num_classes`` (10 or 100) under ``root``: torchvision's data set,
    ``.data`` uint8 [N, 32, 32, 3] and ``.targets``, whose images go through ``transform`` when read."""
    dataset_class, folder = CIFAR_VERSIONS[num_classes]
    if not root:
        raise DatasetError(f"CIFAR-{num_classes} needs --data-path: the folder holding {folder}/ (torchvision's layout)")
    if not os.path.isdir(root):
        raise DatasetError(f"CIFAR-{num_classes} data folder not found: {root} (pass --data-path the folder "
                           f"holding {folder}/)")
    try:
        return dataset_class(root, train=is_train, transform=transform, download=False)
    except RuntimeError:
        # torchvision's only error here: a file missing or failing its checksum.
        raise DatasetError(f"CIFAR-{num_classes} not found in {root}: expected {folder}/ as torchvision writes it "
                           f"(the python version), with intact files; nothing is downloaded") from None
