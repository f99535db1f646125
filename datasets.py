"""Classification's data: the command line's data fields mapped onto ``vkd.data``, and Mixup/CutMix.

Batch format. Both loaders returned by ``build_loaders`` yield ``(samples, targets, num_unreadable)``
(see ``vkd.data.loaders``): ``samples`` float [B, 3, input_size, input_size], normalised with the
ImageNet mean/std; ``targets`` int64 [B] (Mixup, applied by the engine, makes them soft);
``num_unreadable`` how many images of the batch were dropped as unreadable. With Mixup/CutMix on
(they need an even batch), a training batch that became odd also loses its last readable image.
With ``strict_data`` an unreadable image raises ``UnreadableImageError`` naming the file instead.

Data sets (``args.data_set``):
- IMNET: ImageFolder ``<data_path>/train`` and ``<data_path>/val`` (1000 classes expected).
- FOLDER: any ImageFolder with ``train/`` and ``val/``; nb_classes = number of class folders.
- CIFAR: torchvision CIFAR-100 read from ``data_path``; with ``download`` torchvision fetches it there first.
- DIGITS: scikit-learn's 8x8 handwritten digits, exported once to an ImageFolder (``export_digits``).
- FMNIST: Fashion-MNIST's original IDX files (gzipped or not) read from ``data_path``: Debian's
  ``dataset-fashion-mnist`` folder (the default) or torchvision's ``FashionMNIST/raw`` layout.
"""
import argparse
import warnings
from typing import Optional, Tuple

from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset

from vkd.data import cifar, fmnist, folders, loaders, subsets
from vkd.data.digits import DEFAULT_DIGITS_ROOT, export_digits
from vkd.data.fmnist import DEFAULT_FMNIST_ROOT, FMNIST_CLASSES
from vkd.data.folders import UnreadableImageError
from vkd.data.loaders import collate_skipping_unreadable
from vkd.data.mixup import mixup_active
from vkd.data.subsets import balanced_subset_indices
from vkd.data.transforms import (
    EVAL_CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_INPUT_SIZE,
    eval_transform,
    train_transform,
)
from vkd.errors import DatasetError

__all__ = [
    "DATA_FIELDS", "DATA_SETS", "DEFAULT_DIGITS_ROOT", "DEFAULT_FMNIST_ROOT", "EVAL_CROP_RATIO", "IMAGENET_MEAN",
    "IMAGENET_STD", "SMALL_INPUT_SIZE", "SUBSET_FRACTIONS", "DatasetError", "UnreadableImageError",
    "balanced_subset_indices", "build_dataset", "build_loaders", "build_mixup", "build_transform",
    "build_val_loader", "collate_skipping_unreadable", "data_args_from", "default_data_args", "export_digits",
    "mixup_active",
]

DATA_SETS = ("IMNET", "CIFAR", "FOLDER", "DIGITS", "FMNIST")
SUBSET_FRACTIONS = {"1PERCENT": 0.01, "10PERCENT": 0.10, "20PERCENT": 0.20}
IMAGENET_CLASSES = 1000
CIFAR_CLASSES = 100
# Fixed, independent of --seed: the teacher and every student seed train on the same subset, and
# seeds differ only in initialisation and data order.
FMNIST_SUBSET_SEED = 0
VAL_BATCH_FACTOR = 1.5  # the original's validation batch, relative to the training batch

# The training arguments this module reads (config.build_parser defines them and their defaults).
DATA_FIELDS = (
    "data_set", "data_path", "input_size", "subset", "src", "color_jitter", "crop_scale_min",
    "disable_gray_solar_and_blur", "eval_crop_ratio", "strict_data", "mixup", "cutmix", "cutmix_minmax",
    "mixup_prob", "mixup_switch_prob", "mixup_mode", "smoothing", "batch_size", "num_workers", "pin_mem", "seed",
    "repeated_aug", "download",
)


def data_args_from(args) -> argparse.Namespace:
    """The data fields of parsed command-line arguments (``--subset FULL`` becomes None)."""
    resolved = {name: getattr(args, name) for name in DATA_FIELDS}
    resolved["subset"] = None if args.subset == "FULL" else args.subset
    return argparse.Namespace(**resolved)


def default_data_args(**overrides) -> argparse.Namespace:
    """The data fields at the command line's defaults, with ``overrides`` (for tests, benchmarks, analyses)."""
    # config imports this module for its choice lists, so the parser is imported on use, not at import.
    from config import build_parser

    unknown = set(overrides) - set(DATA_FIELDS)
    if unknown:
        raise TypeError(f"unknown data argument(s): {', '.join(sorted(unknown))}")
    return data_args_from(argparse.Namespace(**{**vars(build_parser().parse_args([])), **overrides}))


def build_transform(is_train: bool, args):
    """Three-augment for training, the standard (or, at 32 px and below, size-only) transform for evaluation."""
    if not is_train:
        return eval_transform(args.input_size, args.eval_crop_ratio)
    return train_transform(args.input_size, simple_random_crop=args.src, crop_scale_min=args.crop_scale_min,
                           three_augment=not args.disable_gray_solar_and_blur, color_jitter=args.color_jitter)


def build_dataset(is_train: bool, args) -> Tuple[Dataset, int]:
    """The train or val data set of ``args.data_set`` and its number of classes.

    Every input check (folders, classes, names) runs here, before any long work.
    """
    if args.data_set not in DATA_SETS:
        raise DatasetError(f"unknown data set {args.data_set!r}; valid: {', '.join(DATA_SETS)}")
    if args.subset is not None and args.subset not in SUBSET_FRACTIONS:
        raise DatasetError(f"unknown subset {args.subset!r}; valid: {', '.join(SUBSET_FRACTIONS)} or none")
    transform = build_transform(is_train, args)
    if args.data_set == "CIFAR":
        dataset = cifar.load_cifar(args.data_path, CIFAR_CLASSES, is_train, transform, args.download)
        nb_classes = CIFAR_CLASSES
    elif args.data_set == "FMNIST":
        images, labels = fmnist.read_fmnist(args.data_path, is_train)
        dataset, nb_classes = fmnist.IDXImages(images, labels.tolist(), FMNIST_CLASSES, transform), len(FMNIST_CLASSES)
    elif args.data_set == "DIGITS":
        dataset, nb_classes = folders.build_image_folder(export_digits(args.data_path or DEFAULT_DIGITS_ROOT),
                                                         is_train, transform, args.strict_data)
    else:
        folders.check_data_folder(args.data_path, args.data_set)
        dataset, nb_classes = folders.build_image_folder(args.data_path, is_train, transform, args.strict_data)
        if args.data_set == "IMNET" and nb_classes != IMAGENET_CLASSES:
            warnings.warn(f"IMNET expects {IMAGENET_CLASSES} classes but {args.data_path} has {nb_classes} "
                          f"class folders; training with {nb_classes}")
    if is_train and args.subset is not None:
        seed = FMNIST_SUBSET_SEED if args.data_set == "FMNIST" else args.seed
        subsets.restrict(dataset, balanced_subset_indices(dataset.targets, SUBSET_FRACTIONS[args.subset], seed))
    return dataset, nb_classes


def build_mixup(args, nb_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when both are off."""
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


def build_val_loader(args, dataset_val: Dataset, sharded: bool, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Val loader at 1.5x the batch size (as the original). ``sharded``: an unpadded shard per rank, so
    each image counts once over all ranks; otherwise every rank reads the whole set."""
    return loaders.val_loader(dataset_val, int(VAL_BATCH_FACTOR * args.batch_size), args.num_workers, args.pin_mem,
                              sharded, rank, world_size)


def build_loaders(args, dataset_train: Dataset, dataset_val: Dataset, distributed: bool, rank: int,
                  world_size: int, sharded_val: Optional[bool] = None) -> Tuple[DataLoader, DataLoader]:
    """Train and val loaders yielding ``(samples, targets, num_unreadable)`` (see the module docstring).

    The train sampler has ``set_epoch``; call it every epoch. Validation is sharded per rank when
    distributed, unless ``sharded_val`` is False (see ``build_val_loader``).
    """
    sampler = loaders.train_sampler(dataset_train, args.seed, distributed, rank, world_size, args.repeated_aug)
    train_loader = loaders.train_loader(dataset_train, sampler, args.batch_size, args.num_workers, args.pin_mem,
                                        keep_even=mixup_active(args))
    sharded = distributed if sharded_val is None else sharded_val and distributed
    return train_loader, build_val_loader(args, dataset_val, sharded, rank, world_size)
