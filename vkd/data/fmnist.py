"""Fashion-MNIST from its original IDX files, gzipped or not, never downloaded.

Found in Debian's ``dataset-fashion-mnist`` folder (the default) or under a given folder: the files
themselves, ``raw/``, or torchvision's ``FashionMNIST/raw/``.
"""
import gzip
import os
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vkd.errors import DatasetError

# Where Debian's dataset-fashion-mnist package installs the original files.
DEFAULT_FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
FMNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Folders under the root searched in order: the files themselves, then torchvision's layouts.
FMNIST_LAYOUTS = ("", "raw", os.path.join("FashionMNIST", "raw"))
IDX_UBYTE = 0x08


class IDXImages(Dataset):
    """Grayscale images held as a uint8 array [N, H, W] with their labels (Fashion-MNIST's IDX files).

    Each image becomes a 3-channel PIL image (the gray value copied to R, G and B) before the usual
    train/eval transform, which resizes it to the input size (bicubic), exactly as a folder image:
    the ImageNet pipeline (ColorJitter, 3-channel Normalize, the students' 3-channel stem) expects RGB.
    """

    def __init__(self, data: np.ndarray, targets: Sequence[int], classes: Sequence[str], transform: Callable):
        self.data = data
        self.targets = list(targets)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index]).convert("RGB")
        return self.transform(image), self.targets[index]


def read_idx(path: str, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped when its name ends in .gz) as a uint8 array of ``ndim`` dims."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read IDX file {path}: {str(error).splitlines()[0]}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise DatasetError(f"not an IDX file of {ndim}-D unsigned bytes: {path} (replace it with the original file)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise DatasetError(f"IDX file {path} holds {len(raw) - header} bytes of data, its header announces "
                           f"{int(np.prod(shape))} (shape {shape}): the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: str, name: str) -> Optional[str]:
    for layout in FMNIST_LAYOUTS:
        for candidate in (name, name + ".gz"):
            path = os.path.join(root, layout, candidate)
            if os.path.isfile(path):
                return path
    return None


def read_fmnist(root: Optional[str], is_train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """One Fashion-MNIST split: images [N, 28, 28] and labels [N], both uint8 and read-only.

    ``root`` (default: Debian's folder) may hold the files itself, in ``raw/`` or in torchvision's
    ``FashionMNIST/raw/``, gzipped or not.
    """
    root = root or DEFAULT_FMNIST_ROOT
    images_name, labels_name = FMNIST_FILES[is_train]
    images_path, labels_path = _find_idx(root, images_name), _find_idx(root, labels_name)
    if images_path is None or labels_path is None:
        missing = images_name if images_path is None else labels_name
        raise DatasetError(f"Fashion-MNIST not found: no {missing}[.gz] in {root} (nor in its raw/ or "
                           f"FashionMNIST/raw/); install Debian's package (apt-get install dataset-fashion-mnist, "
                           f"files in {DEFAULT_FMNIST_ROOT}) or pass --data-path to the folder holding torchvision's "
                           f"FashionMNIST/raw; nothing is downloaded")
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if labels.size and labels.max() >= len(FMNIST_CLASSES):
        raise DatasetError(f"{labels_path} has label {labels.max()}; Fashion-MNIST labels lie in 0-9")
    return images, labels
