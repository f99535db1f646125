"""Data sets, transforms, Mixup/CutMix and loaders for training and evaluation.

Batch format. Both loaders returned by ``build_loaders`` yield ``(samples, targets, num_unreadable)``:
- ``samples``: float tensor [B, 3, input_size, input_size], normalised with the ImageNet mean/std;
- ``targets``: int64 tensor [B] of class indices (Mixup, applied by the engine, makes them soft);
- ``num_unreadable``: int64 scalar tensor, how many images of this batch could not be read or
  decoded and were dropped from it.
So B can be below the batch size. With Mixup/CutMix on (they need an even batch), a training batch
that became odd also loses its last readable image. B is 0 only if every image of a batch is
unreadable; under DDP the engine must then still join the step (e.g. a zero loss), as skipping it on
one rank alone would hang the others. With ``strict_data`` an unreadable image raises
``UnreadableImageError`` naming the file instead.

Data sets (``args.data_set``):
- IMNET: ImageFolder ``<data_path>/train`` and ``<data_path>/val`` (1000 classes expected).
- FOLDER: any ImageFolder with ``train/`` and ``val/``; nb_classes = number of class folders.
- CIFAR: torchvision CIFAR-100 read from ``data_path`` (never downloaded).
- DIGITS: scikit-learn's 8x8 handwritten digits, exported once to an ImageFolder (``export_digits``).
- FMNIST: Fashion-MNIST's original IDX files (gzipped or not) read from ``data_path``: Debian's
  ``dataset-fashion-mnist`` folder (the default) or torchvision's ``FashionMNIST/raw`` layout.
Class indices always follow the sorted class folders of ``train/`` (torchvision's rule), for the
validation split too, so a val folder lacking a class cannot shift the labels.
"""
import argparse
import functools
import gzip
import json
import os
import random
import shutil
import tempfile
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler
from torch.utils.data.dataloader import default_collate
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from samplers import DistributedEvalSampler, RASampler, SeededRandomSampler
from vkd.errors import DatasetError

DATA_SETS = ("IMNET", "CIFAR", "FOLDER", "DIGITS", "FMNIST")
SUBSET_FRACTIONS = {"1PERCENT": 0.01, "10PERCENT": 0.10, "20PERCENT": 0.20}
IMAGENET_CLASSES = 1000
CIFAR_CLASSES = 100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875
SMALL_INPUT_SIZE = 32  # at or below it, evaluation neither resizes nor crops (the original's rule)
REPEATED_AUG_REPEATS = 3

# DIGITS export. 32 px = 4x nearest-neighbour upscaling of the 8x8 originals: every stored pixel is
# an original value, so the files hold exactly scikit-learn's data (each original pixel is a 4x4
# block, checked by the tests) and no interpolation detail is invented; the bicubic resizing of
# the training/eval transforms smooths the block edges afterwards. 32 is also a multiple of the
# students' total stride of 16 (2x2 tokens at input 32; the demo may upscale further through
# ``input_size``). RGB because the ImageNet pipeline (ColorJitter, 3-channel Normalize, 3-channel
# stem) expects it.
DIGITS_IMAGE_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
# Fixed, independent of --seed: every run of every seed must see the same train/val split.
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16  # load_digits() pixel values lie in [0, 16]
DIGITS_MANIFEST = "export_complete.json"
DEFAULT_DIGITS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits")

# FMNIST: where Debian's dataset-fashion-mnist package installs the original files.
DEFAULT_FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
FMNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Folders under --data-path searched in order: the files themselves, then torchvision's layouts.
FMNIST_LAYOUTS = ("", "raw", os.path.join("FashionMNIST", "raw"))
# Fixed, independent of --seed: the teacher and every student seed train on the same subset, and
# seeds differ only in initialisation and data order.
FMNIST_SUBSET_SEED = 0
IDX_UBYTE = 0x08


class UnreadableImageError(DatasetError):
    """An image file that cannot be read or decoded, raised only with ``strict_data``.

    Raised in a DataLoader worker, it reaches the main process rebuilt around the worker's whole
    traceback text, whose last line is ``datasets.UnreadableImageError: <message>``; only that
    message is kept, so the run still ends on one line naming the file.
    """

    def __init__(self, message: str):
        last_line = message.strip().splitlines()[-1]
        super().__init__(last_line.split(f"{type(self).__name__}: ", 1)[-1])


def default_data_args(**overrides) -> argparse.Namespace:
    """The data fields of the training arguments at their defaults (the original's effective values)."""
    fields = dict(
        data_set="IMNET", data_path=None, input_size=224, subset=None, src=False, color_jitter=0.3,
        crop_scale_min=0.08, disable_gray_solar_and_blur=False, eval_crop_ratio=EVAL_CROP_RATIO, strict_data=False,
        mixup=0.8, cutmix=1.0, cutmix_minmax=None,
        mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", smoothing=0.1, batch_size=64,
        num_workers=10, pin_mem=True, seed=0, repeated_aug=False,
    )
    unknown = set(overrides) - set(fields)
    if unknown:
        raise TypeError(f"unknown data argument(s): {', '.join(sorted(unknown))}")
    fields.update(overrides)
    return argparse.Namespace(**fields)


def data_args_from(args) -> argparse.Namespace:
    """The data fields of parsed command-line arguments (``--subset FULL`` becomes None)."""
    resolved = {name: getattr(args, name) for name in vars(default_data_args())}
    resolved["subset"] = None if args.subset == "FULL" else args.subset
    return argparse.Namespace(**resolved)


# ----------------------------------------------------------------------------- transforms


class GrayScale:
    """Grayscale kept as 3 channels (DeiT's three-augment ``gray_scale`` with p=1)."""

    def __init__(self):
        self.to_gray = transforms.Grayscale(num_output_channels=3)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.to_gray(image)


class Solarization:
    """PIL solarize at the default threshold 128 (DeiT's three-augment ``Solarization`` with p=1)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image)


class GaussianBlur:
    """PIL Gaussian blur of radius uniform in [0.1, 2] (DeiT's three-augment ``GaussianBlur`` with p=1)."""

    def __init__(self, radius_min: float = 0.1, radius_max: float = 2.0):
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


def _normalise() -> List[Callable]:
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def build_transform(is_train: bool, args) -> transforms.Compose:
    """The original's effective train transform (DeiT three-augment) or the standard eval transform.

    The original also parsed RandAugment and random-erasing flags but never applied them; this is
    the pipeline it actually trained with. ``args.crop_scale_min`` (default 0.08, as the original)
    exists so that tiny images (32 px digits) can keep more of the object per crop;
    ``args.disable_gray_solar_and_blur`` drops the three-augment choice; the eval resize is
    ``input_size / args.eval_crop_ratio`` (0.875: 224 -> 256).
    """
    size = args.input_size
    bicubic = transforms.InterpolationMode.BICUBIC
    if not is_train:
        if size <= SMALL_INPUT_SIZE:
            # The original (as DeiT) evaluates inputs of 32 px or less as they are, with no resize and no
            # centre crop. Resizing to exactly (size, size) is the identity on such images and only
            # changes images of another size (28 px Fashion-MNIST), which would not fit the model otherwise.
            return transforms.Compose([transforms.Resize((size, size), interpolation=bicubic)] + _normalise())
        return transforms.Compose([transforms.Resize(int(size / args.eval_crop_ratio), interpolation=bicubic),
                                   transforms.CenterCrop(size)] + _normalise())
    if args.src:
        geometric = [transforms.Resize(size, interpolation=bicubic),
                     transforms.RandomCrop(size, padding=4, padding_mode="reflect")]
    else:
        geometric = [transforms.RandomResizedCrop(size, scale=(args.crop_scale_min, 1.0), interpolation=bicubic)]
    pipeline = geometric + [transforms.RandomHorizontalFlip()]
    if not args.disable_gray_solar_and_blur:
        pipeline.append(transforms.RandomChoice([GrayScale(), Solarization(), GaussianBlur()]))
    if args.color_jitter:
        jitter = args.color_jitter
        pipeline.append(transforms.ColorJitter(jitter, jitter, jitter))
    return transforms.Compose(pipeline + _normalise())


# ----------------------------------------------------------------------------- folder checks


def _class_folders(split_dir: str) -> List[str]:
    """Class names exactly as torchvision's ImageFolder finds them (sorted sub-folders)."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _has_image(folder: str) -> bool:
    """Stops at the first image, so checking all 1000 ImageNet classes takes milliseconds."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(has_file_allowed_extension(name, IMG_EXTENSIONS) for name in files):
            return True
    return False


def _check_data_folder(data_path: Optional[str], data_set: str) -> None:
    if data_path is None:
        raise DatasetError(f"--data-path is required for --data-set {data_set}")
    if not os.path.exists(data_path):
        raise DatasetError(f"data folder not found: {data_path}")
    if not os.path.isdir(data_path):
        raise DatasetError(f"data path is not a folder: {data_path}")
    if not os.listdir(data_path):
        raise DatasetError(f"data folder is empty: {data_path}")


def _check_split(split_dir: str) -> List[str]:
    """The split's class names, after checking that it exists and that every class has an image."""
    if not os.path.isdir(split_dir):
        raise DatasetError(f"missing split folder: {split_dir}")
    classes = _class_folders(split_dir)
    if not classes:
        raise DatasetError(f"split folder has no class folders: {split_dir}")
    for name in classes:
        if not _has_image(os.path.join(split_dir, name)):
            raise DatasetError(f"class folder has no images "
                               f"({', '.join(sorted(IMG_EXTENSIONS))}): {os.path.join(split_dir, name)}")
    return classes


def _image_folder_classes(root: str, is_train: bool) -> Tuple[str, List[str]]:
    """The requested split folder and the class list defining the labels.

    Training also checks ``val/`` now, since it is evaluated after every epoch. Evaluation alone
    needs only ``val/`` (users often keep just that); the labels then follow val's own folders.
    """
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not is_train and not os.path.isdir(train_dir):
        return val_dir, _check_split(val_dir)
    classes = _check_split(train_dir)
    unknown = sorted(set(_check_split(val_dir)) - set(classes))
    if unknown:
        raise DatasetError(f"{val_dir} has class folders absent from {train_dir}: {', '.join(unknown[:5])}")
    return (train_dir if is_train else val_dir), classes


# ----------------------------------------------------------------------------- data sets


class ImageFolderSkippingUnreadable(datasets.ImageFolder):
    """ImageFolder with a given class list, returning ``(None, target)`` for an unreadable file.

    ``collate_skipping_unreadable`` drops and counts those, so one broken JPEG among a million does
    not kill a multi-day run in the middle of an epoch. With ``strict`` it raises instead.
    """

    def __init__(self, root: str, classes: Sequence[str], transform: Callable, strict: bool):
        self.fixed_classes = list(classes)
        self.strict = strict
        # allow_empty: a val split may lack some of train's classes; empty class folders that do
        # exist were already rejected by _check_split with a clearer message.
        super().__init__(root, transform=transform, allow_empty=True)

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


def _build_image_folder(root: str, is_train: bool, args) -> Tuple[Dataset, int]:
    split_dir, classes = _image_folder_classes(root, is_train)
    dataset = ImageFolderSkippingUnreadable(split_dir, classes, build_transform(is_train, args),
                                            strict=args.strict_data)
    return dataset, len(classes)


def _build_cifar(is_train: bool, args) -> Tuple[Dataset, int]:
    _check_data_folder(args.data_path, "CIFAR")
    try:
        dataset = datasets.CIFAR100(args.data_path, train=is_train, transform=build_transform(is_train, args),
                                    download=False)
    except RuntimeError:
        raise DatasetError(f"CIFAR-100 not found in {args.data_path}: expected the python version "
                           f"(folder cifar-100-python/ with train, test, meta); nothing is downloaded") from None
    return dataset, CIFAR_CLASSES


class IDXImages(Dataset):
    """Grayscale images held as a uint8 array [N, H, W] with their labels (Fashion-MNIST's IDX files).

    Each image becomes a 3-channel PIL image (the gray value copied to R, G and B) before the usual
    train/eval transform, which resizes it to ``input_size`` (bicubic), exactly as a folder image:
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
    """One Fashion-MNIST split from its IDX files: images [N, 28, 28] and labels [N], both uint8.

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


def _build_fmnist(is_train: bool, args) -> Tuple[Dataset, int]:
    images, labels = read_fmnist(args.data_path, is_train)
    dataset = IDXImages(images, labels.tolist(), FMNIST_CLASSES, build_transform(is_train, args))
    return dataset, len(FMNIST_CLASSES)


def balanced_subset_indices(targets: Sequence[int], fraction: float, seed: int) -> List[int]:
    """``fraction`` of every class (at least one image each), chosen with ``seed``; sorted."""
    targets = np.asarray(targets)
    generator = np.random.RandomState(seed)
    chosen = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        keep = max(1, int(round(fraction * len(members))))
        chosen.append(generator.permutation(members)[:keep])
    return sorted(np.concatenate(chosen).tolist())


def _restrict(dataset: Dataset, indices: List[int]) -> None:
    """Keeps only ``indices``, in place, so the data set keeps its type and attributes."""
    dataset.targets = [dataset.targets[i] for i in indices]
    if isinstance(dataset, (datasets.CIFAR100, IDXImages)):
        dataset.data = dataset.data[indices]
    else:
        dataset.samples = [dataset.samples[i] for i in indices]
        dataset.imgs = dataset.samples


def build_dataset(is_train: bool, args) -> Tuple[Dataset, int]:
    """The train or val data set of ``args.data_set`` and its number of classes.

    Every input check (folders, classes, names) runs here, before any long work.
    """
    if args.data_set not in DATA_SETS:
        raise DatasetError(f"unknown data set {args.data_set!r}; valid: {', '.join(DATA_SETS)}")
    if args.subset is not None and args.subset not in SUBSET_FRACTIONS:
        raise DatasetError(f"unknown subset {args.subset!r}; valid: {', '.join(SUBSET_FRACTIONS)} or none")
    if args.data_set == "CIFAR":
        dataset, nb_classes = _build_cifar(is_train, args)
    elif args.data_set == "FMNIST":
        dataset, nb_classes = _build_fmnist(is_train, args)
    elif args.data_set == "DIGITS":
        dataset, nb_classes = _build_image_folder(export_digits(args.data_path or DEFAULT_DIGITS_ROOT),
                                                  is_train, args)
    else:
        _check_data_folder(args.data_path, args.data_set)
        dataset, nb_classes = _build_image_folder(args.data_path, is_train, args)
        if args.data_set == "IMNET" and nb_classes != IMAGENET_CLASSES:
            warnings.warn(f"IMNET expects {IMAGENET_CLASSES} classes but {args.data_path} has {nb_classes} "
                          f"class folders; training with {nb_classes}")
    if is_train and args.subset is not None:
        seed = FMNIST_SUBSET_SEED if args.data_set == "FMNIST" else args.seed
        _restrict(dataset, balanced_subset_indices(dataset.targets, SUBSET_FRACTIONS[args.subset], seed))
    return dataset, nb_classes


# ----------------------------------------------------------------------------- DIGITS export


def _digits_manifest(root: str) -> Optional[dict]:
    """The manifest of a complete export, else None. It is written last, so it marks completion."""
    try:
        with open(os.path.join(root, DIGITS_MANIFEST)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _write_digits(folder: str) -> None:
    """Writes the split into ``folder``/{train,val}/<digit>/<index>.png, then the manifest."""
    # Imported here: scikit-learn takes a second to import and only this export needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=DIGITS_VAL_FRACTION, stratify=digits.target,
                                          random_state=DIGITS_SPLIT_SEED)
    counts = {}
    for split, split_indices in (("train", train_idx), ("val", val_idx)):
        counts[split] = {str(label): 0 for label in range(10)}
        for index in sorted(split_indices):
            label = str(digits.target[index])
            pixels = np.round(digits.images[index] * 255.0 / DIGITS_MAX_VALUE).astype(np.uint8)
            image = Image.fromarray(pixels).resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE),
                                                   Image.Resampling.NEAREST)
            class_dir = os.path.join(folder, split, label)
            os.makedirs(class_dir, exist_ok=True)
            image.convert("RGB").save(os.path.join(class_dir, f"{index:04d}.png"))
            counts[split][label] += 1
    manifest = dict(source="sklearn.datasets.load_digits", image_size=DIGITS_IMAGE_SIZE,
                    upscaling="nearest", split_seed=DIGITS_SPLIT_SEED, val_fraction=DIGITS_VAL_FRACTION,
                    file_name="<index in load_digits()>.png", counts=counts)
    with open(os.path.join(folder, DIGITS_MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=1)


def _publish(staging: str, root: str, force: bool) -> None:
    """Moves the finished export into place with renames, so ``root`` is never half written."""
    if force and os.path.exists(root):
        retired = tempfile.mkdtemp(prefix=".digits-old-", dir=os.path.dirname(root))
        os.rename(root, os.path.join(retired, "previous"))
        os.rename(staging, root)
        shutil.rmtree(retired, ignore_errors=True)
        return
    try:
        os.rename(staging, root)
    except OSError:
        # Another process (e.g. the other DDP rank) published the same export first.
        if _digits_manifest(root) is None:
            raise


def export_digits(root: str, force: bool = False) -> str:
    """Exports scikit-learn's digits once as an ImageFolder at ``root`` and returns ``root``.

    The split (80/20, stratified, seed 0) and the images (see DIGITS_IMAGE_SIZE) are fixed; a
    later call reuses a complete export. The images are written to a temporary folder beside
    ``root`` and renamed into place, so an interrupted export leaves no partial ``root``.
    ``force`` rebuilds it.
    """
    root = os.path.abspath(root)
    # A published export always holds its manifest (it is renamed in whole), so a non-empty root
    # without one is someone else's folder, never our export in progress.
    if not force and os.path.exists(root) and os.listdir(root):
        if _digits_manifest(root) is not None:
            return root
        raise DatasetError(f"{root} exists but is not a complete digits export (no {DIGITS_MANIFEST}); "
                           f"remove it or export with force=True")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".digits-export-", dir=os.path.dirname(root))
    os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; the published data should be readable by all
    try:
        _write_digits(staging)
        _publish(staging, root, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------- mixup and loaders


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup(args, nb_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when both are off."""
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


def collate_skipping_unreadable(batch, keep_even: bool = False):
    """Collates ``(sample, target)`` pairs into ``(samples, targets, num_unreadable)``, dropping the
    unreadable ones (sample None). ``keep_even`` drops one more image from an odd batch, for
    timm's Mixup, which asserts an even batch."""
    readable = [item for item in batch if item[0] is not None]
    num_unreadable = torch.tensor(len(batch) - len(readable), dtype=torch.int64)
    if keep_even and len(readable) % 2:
        readable = readable[:-1]
    if not readable:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), num_unreadable
    samples, targets = default_collate(readable)
    return samples, targets, num_unreadable


def _train_sampler(args, dataset: Dataset, distributed: bool, rank: int, world_size: int):
    if not distributed:
        # Repeated augmentation only makes sense across ranks (DeiT applies it only when distributed).
        return SeededRandomSampler(dataset, seed=args.seed)
    if args.repeated_aug:
        return RASampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                         num_repeats=REPEATED_AUG_REPEATS, seed=args.seed)
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                              drop_last=True)


def build_val_loader(args, dataset_val: Dataset, sharded: bool, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Val loader at 1.5x the batch size (as the original). ``sharded``: an unpadded shard per rank, so
    each image counts once over all ranks; otherwise every rank reads the whole set."""
    sampler = (DistributedEvalSampler(dataset_val, num_replicas=world_size, rank=rank) if sharded
               else SequentialSampler(dataset_val))
    return DataLoader(dataset_val, sampler=sampler, batch_size=int(1.5 * args.batch_size),
                      num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=False,
                      collate_fn=collate_skipping_unreadable)


def build_loaders(args, dataset_train: Dataset, dataset_val: Dataset, distributed: bool, rank: int,
                  world_size: int, sharded_val: Optional[bool] = None) -> Tuple[DataLoader, DataLoader]:
    """Train and val loaders yielding ``(samples, targets, num_unreadable)`` (see the module docstring).

    The train sampler has ``set_epoch``; call it every epoch. Validation is sharded per rank when
    distributed, unless ``sharded_val`` is False (see ``build_val_loader``).
    """
    train_sampler = _train_sampler(args, dataset_train, distributed, rank, world_size)
    if len(train_sampler) < args.batch_size:
        raise DatasetError(f"the training set has {len(train_sampler)} images per process, fewer than one "
                           f"batch of {args.batch_size} (batches are full-size only)")
    train_loader = DataLoader(dataset_train, sampler=train_sampler, batch_size=args.batch_size,
                              num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=True,
                              collate_fn=functools.partial(collate_skipping_unreadable,
                                                           keep_even=mixup_active(args)))
    sharded = distributed if sharded_val is None else sharded_val and distributed
    return train_loader, build_val_loader(args, dataset_val, sharded, rank, world_size)
