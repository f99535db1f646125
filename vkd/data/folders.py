"""ImageFolder data (``<root>/train/<class>/*``, ``<root>/val/<class>/*``), checked before any long work.

Class indices always follow the sorted class folders of ``train/`` (torchvision's rule), for the
validation split too, so a val folder lacking a class cannot shift the labels. An unreadable image
is skipped (returned as ``(None, target)``, for ``loaders.collate_skipping_unreadable``) or, when
strict, raised as ``UnreadableImageError`` naming the file. Every image is read by ``open_rgb_image``,
which predict.py and export.py's check use too.
"""
import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from vkd.errors import DatasetError

# PIL's modes of 16-bit grey images (PNG, TIFF; "I" is the 32-bit mode older PIL versions and convert("I") give
# them). PIL's convert("RGB") clips their 0..65535 levels to 0..255, which turns a photograph black and white.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_TO_EIGHT_BITS = 65535 / 255  # 257: 65535 -> 255, 257 * n -> n


class UnreadableImageError(DatasetError):
    """An image file that cannot be read or decoded, raised only when strict.

    Raised in a DataLoader worker, it reaches the main process rebuilt around the worker's whole
    traceback text, whose last line is ``vkd.data.folders.UnreadableImageError: <message>``; only that
    message is kept, so the run still ends on one line naming the file.
    """

    def __init__(self, message: str):
        last_line = message.strip().splitlines()[-1]
        super().__init__(last_line.split(f"{type(self).__name__}: ", 1)[-1])


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, 16-bit grey scaled to 8 bits (rounded) rather than clipped."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / SIXTEEN_TO_EIGHT_BITS
        image = Image.fromarray(np.round(levels).astype(np.uint8))
    return image.convert("RGB")


def open_rgb_image(path: str) -> Image.Image:
    """The image file at ``path``, decoded, as 8-bit RGB (``to_rgb``).

    PIL decodes an image of more pixels than its decompression-bomb limit (89 M) with a two-line warning and
    refuses one of more than twice as many; the first is read here without the warning, the second fails.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            return to_rgb(image)


def check_data_folder(data_path: Optional[str], data_set: str) -> None:
    """``data_path`` is given, exists, is a folder and is not empty (``data_set`` names the flag's value)."""
    if data_path is None:
        raise DatasetError(f"--data-path is required for --data-set {data_set}")
    if not os.path.exists(data_path):
        raise DatasetError(f"data folder not found: {data_path}")
    if not os.path.isdir(data_path):
        raise DatasetError(f"data path is not a folder: {data_path}")
    if not os.listdir(data_path):
        raise DatasetError(f"data folder is empty: {data_path}")


def _class_folders(split_dir: str) -> List[str]:
    """Class names exactly as torchvision's ImageFolder finds them (sorted sub-folders)."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _has_image(folder: str) -> bool:
    """Stops at the first image, so checking all 1000 ImageNet classes takes milliseconds."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(has_file_allowed_extension(name, IMG_EXTENSIONS) for name in files):
            return True
    return False


def _refuse_folders_reached_twice(split_dir: str) -> None:
    """ImageFolder follows links to folders; a link back up (``cat/again -> .``, ``cat/up -> ..``) would make
    it read the same images many times, under the wrong labels. Any folder reached twice is refused."""
    seen = {os.path.realpath(split_dir)}
    for folder, subfolders, _ in os.walk(split_dir, followlinks=True):
        for name in subfolders:
            path = os.path.join(folder, name)
            if os.path.realpath(path) in seen:
                raise DatasetError(f"{path} leads to {os.path.realpath(path)}, a folder the split already holds "
                                   f"(a link back up, or a second link to one folder): remove the link")
            seen.add(os.path.realpath(path))


def _check_split(split_dir: str) -> List[str]:
    """The split's class names, after checking that it exists, that no folder is reached twice through
    links, and that every class has an image."""
    if not os.path.isdir(split_dir):
        raise DatasetError(f"missing split folder: {split_dir}")
    _refuse_folders_reached_twice(split_dir)
    classes = _class_folders(split_dir)
    if not classes:
        raise DatasetError(f"split folder has no class folders: {split_dir}")
    for name in classes:
        if not _has_image(os.path.join(split_dir, name)):
            raise DatasetError(f"class folder has no images "
                               f"({', '.join(sorted(IMG_EXTENSIONS))}): {os.path.join(split_dir, name)}")
    return classes


def split_and_classes(root: str, is_train: bool) -> Tuple[str, List[str]]:
    """The requested split folder and the class list defining the labels.

    Training also checks ``val/``, since it is evaluated after every epoch. Evaluation alone needs
    only ``val/`` (users often keep just that); the labels then follow val's own folders.
    """
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not is_train and not os.path.isdir(train_dir):
        return val_dir, _check_split(val_dir)
    classes = _check_split(train_dir)
    unknown = sorted(set(_check_split(val_dir)) - set(classes))
    if unknown:
        raise DatasetError(f"{val_dir} has class folders absent from {train_dir}: {', '.join(unknown[:5])}")
    return (train_dir if is_train else val_dir), classes


class ImageFolderSkippingUnreadable(ImageFolder):
    """ImageFolder with a given class list, returning ``(None, target)`` for an unreadable file.

    ``loaders.collate_skipping_unreadable`` drops and counts those, so one broken JPEG among a million
    does not kill a multi-day run in the middle of an epoch. With ``strict`` it raises instead.
    """

    def __init__(self, root: str, classes: Sequence[str], transform: Callable, strict: bool):
        self.fixed_classes = list(classes)
        self.strict = strict
        # allow_empty: a val split may lack some of train's classes; empty class folders that do
        # exist were already rejected by _check_split with a clearer message.
        super().__init__(root, transform=transform, loader=open_rgb_image, allow_empty=True)

    def find_classes(self, directory: str):
        return self.fixed_classes, {name: index for index, name in enumerate(self.fixed_classes)}

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        # The try holds only PIL's open and decode, which raise a wide, undocumented set of types
        # on malformed files (OSError, SyntaxError, ValueError, struct.error, DecompressionBombError...).
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            if self.strict:
                raise UnreadableImageError(f"unreadable image file: {path} ({reason})") from None
            warnings.warn(f"skipping unreadable image file: {path} ({reason})")
            return None, target
        return self.transform(image), target


def build_image_folder(root: str, is_train: bool, transform: Callable,
                       strict: bool) -> Tuple[ImageFolderSkippingUnreadable, int]:
    """The checked train or val split of ``root`` and its number of classes (train's class folders)."""
    split_dir, classes = split_and_classes(root, is_train)
    return ImageFolderSkippingUnreadable(split_dir, classes, transform, strict), len(classes)


def read_split_arrays(root: str, is_train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Every image of a split as one uint8 array [N, H, W, 3] (RGB, all of one size) and int64 labels [N].

    For data small enough to hold in memory (generation's real images); an unreadable file is an error.
    """
    dataset, _ = build_image_folder(root, is_train, transform=np.asarray, strict=True)
    images = [dataset[index][0] for index in range(len(dataset))]
    return np.stack(images), np.asarray(dataset.targets, dtype=np.int64)
