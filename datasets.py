"""Classification's data: the command line's data fields mapped onto ``vkd.data``, and Mixup/CutMix.

Batch format. Both loaders returned by ``build_loaders`` yield ``(samples, targets, num_unreadable)``
(see ``vkd.data.loaders``): ``samples`` float [B, 3, input_size, input_size], normalised with the
ImageNet mean/std; ``targets`` int64 [B] (Mixup, applied by the engine, makes them soft);
``num_unreadable`` how many images of the batch were dropped as unreadable. With Mixup/CutMix on
(they need an even batch), a training batch that became odd also loses its last readable image.
With ``strict_data`` an unreadable image raises ``UnreadableImageError`` naming the file instead.

Data sets (``args.data_set``):
- IMNET: ImageFolder ``<data_path>/train`` and ``<data_path>/val`` (1000 classes expected).
- FOLDER: any ImageFolder with ``train/`` and ``val/``; num_classes = number of class folders.
- CIFAR (or C100, generation's name for it): torchvision CIFAR-100 read from ``data_path``; with ``download``
  torchvision fetches it there first.
- DIGITS: scikit-learn's 8x8 handwritten digits, exported once to an ImageFolder (``export_digits``).
- FMNIST: Fashion-MNIST's original IDX files (gzipped or not) read from ``data_path``: Debian's
  ``dataset-fashion-mnist`` folder (the default) or torchvision's ``FashionMNIST/raw`` layout.
"""
import argparse
import os
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
from vkd.data.subsets import SUBSET_FRACTIONS, balanced_subset_indices
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

DATA_SETS = ("IMNET", "CIFAR", "C100", "FOLDER", "DIGITS", "FMNIST")
CIFAR_100_NAMES = ("CIFAR", "C100")  # the paper's name here, and generation's
IMAGENET_CLASSES = 1000
CIFAR_CLASSES = 100
# Fixed, independent of --seed: the teacher and every student seed train on the same subset, and
# seeds differ only in initialisation and data order.
FMNIST_SUBSET_SEED = 0
VAL_BATCH_FACTOR = 1.5  # the original's validation batch, relative to the training batch

ORIGINAL_WORKERS = 12
INFINITY = float("inf")
# Flags the original parsed but never applied (RandAugment, random erasing, an interpolation choice): they parse,
# so the original's commands run, are hidden from --help, and setting one is an error (NO_EFFECT).
COMPATIBILITY_ONLY = argparse.SUPPRESS

# The training arguments this module reads (``add_arguments`` defines them and their defaults).
DATA_FIELDS = (
    "data_set", "data_path", "input_size", "subset", "src", "color_jitter", "crop_scale_min",
    "disable_gray_solar_and_blur", "eval_crop_ratio", "strict_data", "mixup", "cutmix", "cutmix_minmax",
    "mixup_prob", "mixup_switch_prob", "mixup_mode", "smoothing", "batch_size", "num_workers", "pin_mem", "seed",
    "repeated_aug", "download",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, loading and augmentation flags (the original's names and the defaults it trained with)."""
    data = parser.add_argument_group("data")
    data.add_argument("--data-path", default=None, type=str, help="dataset folder")
    data.add_argument("--data-set", default="IMNET", choices=DATA_SETS)
    data.add_argument("--download", action="store_true",
                      help="CIFAR: torchvision downloads it into --data-path when it is not there")
    data.add_argument("--subset", default="FULL", choices=("FULL",) + tuple(SUBSET_FRACTIONS),
                      help="class-balanced, seeded training subset (default: FULL)")
    data.add_argument("--strict-data", action="store_true", help="an unreadable image is an error, not skipped")
    data.add_argument("--input-size", default=224, type=int, help="image size (default: 224)")
    data.add_argument("--batch-size", default=512, type=int, help="per-process batch size (default: 512)")
    data.add_argument("--seed", default=0, type=int,
                      help="seed of the data order, the augmentation and the initialisation; each process uses "
                           "seed + rank (default: 0)")
    data.add_argument("--num_workers", default=min(ORIGINAL_WORKERS, len(os.sched_getaffinity(0))), type=int,
                      help=f"loader processes per rank (default: {ORIGINAL_WORKERS}, the original's, or the "
                           f"number of usable CPUs if fewer)")
    data.add_argument("--pin-mem", action="store_true", help="pin loader memory on a GPU (default)")
    data.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    data.set_defaults(pin_mem=True)
    data.add_argument("--eval-crop-ratio", default=EVAL_CROP_RATIO, type=float,
                      help=f"eval resize = input / ratio, then a centre crop (default: {EVAL_CROP_RATIO})")
    augmentation = parser.add_argument_group("augmentation")
    augmentation.add_argument("--color-jitter", type=float, default=0.3, metavar="PCT", help="(default: 0.3)")
    augmentation.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    augmentation.add_argument("--repeated-aug", action="store_true", help="repeated augmentation across ranks")
    augmentation.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    augmentation.set_defaults(repeated_aug=False)
    augmentation.add_argument("--src", action="store_true", help="simple random crop instead of RandomResizedCrop")
    augmentation.add_argument("--disable-gray-solar-and-blur", action="store_true",
                              help="train without the random grayscale/solarize/blur choice (three-augment)")
    augmentation.add_argument("--crop-scale-min", type=float, default=0.08,
                              help="RandomResizedCrop min scale (default: 0.08)")
    augmentation.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, on if > 0 (default: 0.8)")
    augmentation.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha, on if > 0 (default: 1.0)")
    augmentation.add_argument("--cutmix-minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio")
    augmentation.add_argument("--mixup-prob", type=float, default=1.0, help="(default: 1.0)")
    augmentation.add_argument("--mixup-switch-prob", type=float, default=0.5, help="(default: 0.5)")
    augmentation.add_argument("--mixup-mode", type=str, default="batch", choices=("batch", "pair", "elem"))
    for flag, kind, default in (("--aa", str, None), ("--train-interpolation", str, "bicubic"),
                                ("--reprob", float, 0.0), ("--remode", str, "pixel"), ("--recount", int, 1)):
        augmentation.add_argument(flag, type=kind, default=default, help=COMPATIBILITY_ONLY)
    augmentation.add_argument("--resplit", action="store_true", default=False, help=COMPATIBILITY_ONLY)


# dest: (low, high, low included, high included); values outside are one error line, not a traceback later.
VALUE_RANGES = {
    "smoothing": (0.0, 1.0, True, False), "mixup": (0.0, INFINITY, True, False),
    "cutmix": (0.0, INFINITY, True, False), "mixup_prob": (0.0, 1.0, True, True),
    "mixup_switch_prob": (0.0, 1.0, True, True), "color_jitter": (0.0, INFINITY, True, False),
    "crop_scale_min": (0.0, 1.0, False, True), "eval_crop_ratio": (0.0, 1.0, False, True),
}
# (applies when, flags that then have no effect, why).
NO_EFFECT = (
    (lambda a: True, {"aa", "reprob", "remode", "recount", "resplit", "train_interpolation"},
     "RandAugment, random erasing and an interpolation choice are not in the pipeline (the original never applied "
     "them; its crops are bicubic)"),
    (lambda a: a.input_size <= SMALL_INPUT_SIZE, {"eval_crop_ratio"},
     "inputs of 32 px or less are evaluated without resize or centre crop, as in the original"),
    (lambda a: a.data_set not in CIFAR_100_NAMES, {"download"},
     "it applies to --data-set CIFAR; the other data sets are read from local files"),
    (lambda a: not mixup_active(a), {"mixup_prob", "mixup_switch_prob", "mixup_mode", "cutmix_minmax"},
     "mixup and cutmix are off"),
)


def data_args_from(args, pin_memory: Optional[bool] = None) -> argparse.Namespace:
    """The data fields of parsed command-line arguments (``--subset FULL`` becomes None); ``pin_memory``, where
    the run has decided it for its device, replaces ``--pin-mem``."""
    resolved = {name: getattr(args, name) for name in DATA_FIELDS}
    resolved["subset"] = None if args.subset == "FULL" else args.subset
    if pin_memory is not None:
        resolved["pin_mem"] = pin_memory
    return argparse.Namespace(**resolved)


def default_data_args(**overrides) -> argparse.Namespace:
    """The data fields at the command line's defaults, with ``overrides`` (for tests, benchmarks, analyses)."""
    unknown = set(overrides) - set(DATA_FIELDS)
    if unknown:
        raise TypeError(f"unknown data argument(s): {', '.join(sorted(unknown))}")
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return data_args_from(argparse.Namespace(**{**vars(parser.parse_args([])), **overrides}))


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
    if args.data_set in CIFAR_100_NAMES:
        dataset = cifar.load_cifar(args.data_path, CIFAR_CLASSES, is_train, transform, args.download)
        num_classes = CIFAR_CLASSES
    elif args.data_set == "FMNIST":
        images, labels = fmnist.read_fmnist(args.data_path, is_train)
        dataset, num_classes = fmnist.IDXImages(images, labels.tolist(), FMNIST_CLASSES, transform), len(FMNIST_CLASSES)
    elif args.data_set == "DIGITS":
        dataset, num_classes = folders.build_image_folder(export_digits(args.data_path or DEFAULT_DIGITS_ROOT),
                                                         is_train, transform, args.strict_data)
    else:
        folders.check_data_folder(args.data_path, args.data_set)
        dataset, num_classes = folders.build_image_folder(args.data_path, is_train, transform, args.strict_data)
        if args.data_set == "IMNET" and num_classes != IMAGENET_CLASSES:
            warnings.warn(f"IMNET expects {IMAGENET_CLASSES} classes but {args.data_path} has {num_classes} "
                          f"class folders; training with {num_classes}")
    if is_train and args.subset is not None:
        seed = FMNIST_SUBSET_SEED if args.data_set == "FMNIST" else args.seed
        subsets.restrict(dataset, balanced_subset_indices(dataset.targets, SUBSET_FRACTIONS[args.subset], seed))
    return dataset, num_classes


def build_mixup(args, num_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when both are off."""
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


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
