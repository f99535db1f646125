"""Data sets, transforms, samplers, loaders and bad-input errors on tiny data built in tmp_path (CPU, seconds)."""
import os
import re

import numpy as np
import pytest
import torch
from conftest import write_idx
from PIL import Image
from torchvision import transforms

import datasets
from datasets import (
    DatasetError,
    UnreadableImageError,
    balanced_subset_indices,
    build_dataset,
    build_loaders,
    build_mixup,
    build_transform,
    collate_skipping_unreadable,
    default_data_args,
    export_digits,
)
from vkd.data import digits as data_digits
from vkd.data.samplers import DistributedEvalSampler, RASampler, SeededRandomSampler

CLASSES = ("cat", "dog", "emu")


def write_image(path, size=(40, 30), seed=0, fmt=None):
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def make_image_folder(root, train_per_class=4, val_per_class=2, classes=CLASSES):
    """train/ and val/ with alternating PNG and JPEG files of random pixels."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for class_index, name in enumerate(classes):
            for i in range(count):
                extension = "png" if i % 2 == 0 else "jpg"
                write_image(os.path.join(root, split, name, f"{i}.{extension}"), seed=100 * class_index + i)
    return str(root)


def folder_args(root, **overrides):
    fields = dict(data_set="FOLDER", data_path=str(root), input_size=32, num_workers=0, pin_mem=False,
                  batch_size=2)
    fields.update(overrides)
    return default_data_args(**fields)


# ----------------------------------------------------------------------------- data set kinds


def test_folder_dataset_counts_labels_and_shapes(tmp_path):
    args = folder_args(make_image_folder(tmp_path))
    train, num_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert num_classes == 3
    assert (len(train), len(val)) == (12, 6)
    assert train.classes == list(CLASSES)
    assert sorted(set(train.targets)) == [0, 1, 2]
    sample, target = val[len(val) - 1]
    assert sample.shape == (3, 32, 32) and target == 2


def test_imnet_layout_warns_about_class_count(tmp_path):
    args = folder_args(make_image_folder(tmp_path), data_set="IMNET")
    with pytest.warns(UserWarning, match="expects 1000 classes but .* has 3 class folders"):
        dataset, num_classes = build_dataset(True, args)
    assert num_classes == 3 and len(dataset) == 12


def test_val_labels_follow_train_classes_even_when_val_lacks_one(tmp_path):
    root = make_image_folder(tmp_path)
    for name in os.listdir(os.path.join(root, "val", "cat")):
        os.remove(os.path.join(root, "val", "cat", name))
    os.rmdir(os.path.join(root, "val", "cat"))
    val, num_classes = build_dataset(False, folder_args(root))
    # torchvision alone would renumber dog/emu as 0/1 here, shifting every val label.
    assert num_classes == 3 and sorted(set(val.targets)) == [1, 2]


def test_val_class_absent_from_train_is_an_error(tmp_path):
    root = make_image_folder(tmp_path)
    write_image(os.path.join(root, "val", "fox", "0.png"))
    with pytest.raises(DatasetError, match="absent from .*train: fox"):
        build_dataset(True, folder_args(root))


def test_evaluation_needs_only_the_val_split(tmp_path):
    root = make_image_folder(tmp_path)
    os.rename(os.path.join(root, "train"), os.path.join(root, "elsewhere"))
    val, num_classes = build_dataset(False, folder_args(root))
    assert (len(val), num_classes) == (6, 3)


def test_digits_export_counts_split_and_exact_pixels(digits_root):
    from sklearn.datasets import load_digits

    manifest = data_digits._digits_manifest(digits_root)
    train_counts = {name: len(os.listdir(os.path.join(digits_root, "train", name))) for name in map(str, range(10))}
    val_counts = {name: len(os.listdir(os.path.join(digits_root, "val", name))) for name in map(str, range(10))}
    assert manifest["counts"] == {"train": train_counts, "val": val_counts}
    assert sum(train_counts.values()) == 1437 and sum(val_counts.values()) == 360
    class_totals = np.bincount(load_digits().target)
    for label in range(10):  # stratified: each class splits 80/20 to within one image
        assert abs(val_counts[str(label)] - 0.2 * class_totals[label]) <= 1
    digits = load_digits()
    index = int(os.listdir(os.path.join(digits_root, "val", "7"))[0].split(".")[0])
    image = np.asarray(Image.open(os.path.join(digits_root, "val", "7", f"{index:04d}.png")))
    assert digits.target[index] == 7 and image.shape == (32, 32, 3)
    expected = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
    assert np.array_equal(image[::4, ::4, 0], expected)
    assert np.array_equal(image[3::4, 3::4, 2], expected)  # every 4x4 block holds one original pixel


def test_digits_export_is_reused_and_leaves_no_temporary_folder(digits_root):
    probe = os.path.join(digits_root, "train", "0", sorted(os.listdir(os.path.join(digits_root, "train", "0")))[0])
    before = os.stat(probe).st_mtime_ns
    assert export_digits(digits_root) == digits_root
    assert os.stat(probe).st_mtime_ns == before
    assert os.listdir(os.path.dirname(digits_root)) == ["digits"]


def test_digits_build_dataset(digits_root):
    args = default_data_args(data_set="DIGITS", data_path=digits_root, input_size=32)
    train, num_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert (len(train), len(val), num_classes) == (1437, 360, 10)
    assert train[0][0].shape == (3, 32, 32)


def test_interrupted_digits_export_leaves_nothing(tmp_path, monkeypatch):
    def write_half_then_die(folder):
        write_image(os.path.join(folder, "train", "0", "0000.png"))
        raise KeyboardInterrupt

    monkeypatch.setattr(data_digits, "_write_digits", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_digits(str(tmp_path / "digits"))
    assert os.listdir(tmp_path) == []


def test_digits_export_refuses_a_foreign_folder_and_force_rebuilds(tmp_path):
    root = tmp_path / "digits"
    write_image(str(root / "train" / "0" / "stray.png"))
    with pytest.raises(DatasetError, match="not a complete digits export"):
        export_digits(str(root))
    export_digits(str(root), force=True)
    assert not (root / "train" / "0" / "stray.png").exists()
    assert data_digits._digits_manifest(str(root))["counts"]["val"]["3"] == 37
    assert sorted(os.listdir(tmp_path)) == ["digits"]


# ----------------------------------------------------------------------------- subsets


def test_subset_is_class_balanced_and_reproducible(digits_root):
    args = default_data_args(data_set="DIGITS", data_path=digits_root, input_size=32, subset="10PERCENT", seed=3)
    first, _ = build_dataset(True, args)
    again, _ = build_dataset(True, args)
    other, _ = build_dataset(True, default_data_args(**{**vars(args), "seed": 4}))
    per_class = np.bincount(first.targets)
    full_per_class = np.bincount(build_dataset(True, default_data_args(**{**vars(args), "subset": None}))[0].targets)
    assert per_class.tolist() == [round(0.1 * count) for count in full_per_class]
    assert first.samples == again.samples
    assert first.samples != other.samples
    assert all(target == first.class_to_idx[os.path.basename(os.path.dirname(path))]
               for path, target in first.samples)
    one_percent, _ = build_dataset(True, default_data_args(**{**vars(args), "subset": "1PERCENT"}))
    assert np.bincount(one_percent.targets).tolist() == [1] * 10


def test_subset_applies_to_train_only(digits_root):
    args = default_data_args(data_set="DIGITS", data_path=digits_root, input_size=32, subset="1PERCENT")
    assert len(build_dataset(False, args)[0]) == 360


def test_balanced_subset_indices_keeps_at_least_one_per_class():
    targets = [0] * 250 + [1] * 3
    chosen = balanced_subset_indices(targets, 0.01, seed=0)
    assert np.bincount(np.asarray(targets)[chosen]).tolist() == [2, 1]


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("src", [False, True])
def test_transform_shapes(size, src):
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (37, 50, 3), dtype=np.uint8))
    args = default_data_args(input_size=size, src=src)
    for is_train in (True, False):
        for _ in range(5):  # the three-augment branch is random: exercise several
            assert build_transform(is_train, args)(image).shape == (3, size, size)


def test_eval_transform_resizes_by_0_875_and_normalises():
    args = default_data_args(input_size=224)
    steps = build_transform(False, args).transforms
    assert steps[0].size == 256 and steps[1].size == (224, 224)
    grey = Image.new("RGB", (300, 300), (128, 128, 128))
    expected = (128 / 255 - torch.tensor(datasets.IMAGENET_MEAN)) / torch.tensor(datasets.IMAGENET_STD)
    assert torch.allclose(build_transform(False, args)(grey)[:, 100, 100], expected, atol=1e-5)


def test_train_transform_is_the_three_augment_pipeline():
    steps = build_transform(True, default_data_args(crop_scale_min=0.35)).transforms
    names = [type(step).__name__ for step in steps]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomChoice", "ColorJitter", "ToTensor",
                     "Normalize"]
    assert steps[0].scale == (0.35, 1.0)
    assert [type(t).__name__ for t in steps[2].transforms] == ["GrayScale", "Solarization", "GaussianBlur"]
    assert steps[3].brightness == (0.7, 1.3)
    no_jitter = build_transform(True, default_data_args(color_jitter=0.0)).transforms
    assert "ColorJitter" not in [type(step).__name__ for step in no_jitter]


def test_disable_gray_solar_and_blur_drops_only_the_three_augment_choice():
    steps = build_transform(True, default_data_args(disable_gray_solar_and_blur=True)).transforms
    assert [type(step).__name__ for step in steps] == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter",
                                                       "ToTensor", "Normalize"]


@pytest.mark.parametrize("ratio, resize", [(1.0, 224), (0.9, 248), (0.5, 448)])
def test_eval_crop_ratio_sets_the_resize_before_the_centre_crop(ratio, resize):
    steps = build_transform(False, default_data_args(input_size=224, eval_crop_ratio=ratio)).transforms
    assert steps[0].size == resize and steps[1].size == (224, 224)


# ----------------------------------------------------------------------------- samplers and loaders


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("num_images", [7, 2])
def test_eval_sampler_covers_each_index_exactly_once(world_size, num_images):
    shards = [list(DistributedEvalSampler(range(num_images), num_replicas=world_size, rank=rank))
              for rank in range(world_size)]
    assert sorted(sum(shards, [])) == list(range(num_images))
    assert [len(shard) for shard in shards] == [len(DistributedEvalSampler(range(num_images), world_size, rank))
                                                for rank in range(world_size)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_distributed_val_loaders_count_each_image_once(tmp_path):
    root = make_image_folder(tmp_path, train_per_class=4, val_per_class=3)
    # 7 val images: an odd count, which torch's DistributedSampler would pad with duplicates.
    os.remove(os.path.join(root, "val", "emu", "2.png"))
    os.remove(os.path.join(root, "val", "dog", "2.png"))
    args = folder_args(root)
    train, _ = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert len(val) == 7
    for world_size in (2, 3):
        seen = []
        for rank in range(world_size):
            _, val_loader = build_loaders(args, train, val, distributed=True, rank=rank, world_size=world_size)
            seen += [target for _, targets, _ in val_loader for target in targets.tolist()]
        assert sorted(seen) == sorted(val.targets)


def test_train_sampler_kinds_and_set_epoch(tmp_path):
    args = folder_args(make_image_folder(tmp_path), seed=5)
    train, _ = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    single, _ = build_loaders(args, train, val, distributed=False, rank=0, world_size=1)
    assert isinstance(single.sampler, SeededRandomSampler)
    single.sampler.set_epoch(1)
    epoch_one = list(single.sampler)
    single.sampler.set_epoch(2)
    assert list(single.sampler) != epoch_one
    single.sampler.set_epoch(1)
    assert list(single.sampler) == epoch_one and sorted(epoch_one) == list(range(12))
    ddp, _ = build_loaders(args, train, val, distributed=True, rank=1, world_size=2)
    assert isinstance(ddp.sampler, torch.utils.data.DistributedSampler) and ddp.sampler.seed == 5
    assert len(ddp.sampler) == 6 and ddp.sampler.drop_last
    ra_args = folder_args(args.data_path, seed=5, repeated_aug=True)
    ra, _ = build_loaders(ra_args, train, val, distributed=True, rank=0, world_size=2)
    assert isinstance(ra.sampler, RASampler)


def test_ra_sampler_deals_three_copies_across_ranks():
    shards = [RASampler(range(8), num_replicas=3, rank=rank, seed=1) for rank in range(3)]
    for shard in shards:
        shard.set_epoch(4)
    indices = [list(shard) for shard in shards]
    assert [len(shard) for shard in indices] == [8 // 3] * 3
    # The three copies of an image sit at the same step on different ranks.
    assert indices[0] == indices[1] == indices[2]
    shards[0].set_epoch(5)
    assert list(shards[0]) != indices[0]


def test_loader_batches_and_sizes(tmp_path):
    args = folder_args(make_image_folder(tmp_path), batch_size=4)
    train, _ = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    train_loader, val_loader = build_loaders(args, train, val, distributed=False, rank=0, world_size=1)
    samples, targets, num_unreadable = next(iter(train_loader))
    assert samples.shape == (4, 3, 32, 32) and targets.dtype == torch.int64
    assert num_unreadable.dtype == torch.int64 and num_unreadable.item() == 0
    assert len(train_loader) == 3
    assert val_loader.batch_size == 6 and len(val_loader) == 1


def test_training_set_smaller_than_one_batch_is_an_error(tmp_path):
    args = folder_args(make_image_folder(tmp_path), batch_size=64)
    train, _ = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    with pytest.raises(DatasetError, match="12 images per process, fewer than one batch of 64"):
        build_loaders(args, train, val, distributed=False, rank=0, world_size=1)


def test_mixup_settings_and_off_switch():
    mixup = build_mixup(default_data_args(), num_classes=10)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert mixup.mode == "batch" and mixup.label_smoothing == 0.1
    _, soft_targets = mixup(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert soft_targets.shape == (4, 10) and torch.allclose(soft_targets.sum(1), torch.ones(4))
    assert build_mixup(default_data_args(mixup=0.0, cutmix=0.0), num_classes=10) is None
    assert build_mixup(default_data_args(mixup=0.0, cutmix=0.0, cutmix_minmax=(0.2, 0.8)), num_classes=10) is not None


# ----------------------------------------------------------------------------- unreadable images


def add_corrupt_files(root):
    """A truncated JPEG and a non-image with a .jpg name, in train/cat."""
    truncated = os.path.join(root, "train", "cat", "truncated.jpg")
    write_image(truncated, size=(64, 64), fmt="JPEG")
    with open(truncated, "rb") as handle:
        data = handle.read()
    with open(truncated, "wb") as handle:
        handle.write(data[:len(data) // 2])
    with open(os.path.join(root, "train", "cat", "garbage.jpg"), "wb") as handle:
        handle.write(b"not a jpeg at all")
    return truncated


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path)
    add_corrupt_files(root)
    args = folder_args(root, batch_size=7, mixup=0.0, cutmix=0.0)
    train, _ = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    train_loader, _ = build_loaders(args, train, val, distributed=False, rank=0, world_size=1)
    with pytest.warns(UserWarning, match="skipping unreadable image file: .*(truncated|garbage).jpg"):
        batches = list(train_loader)
    assert len(batches) == 2  # 14 files, batch 7
    assert sum(int(unreadable) for _, _, unreadable in batches) == 2
    assert sum(len(samples) for samples, _, _ in batches) == 12
    assert all(len(samples) == len(targets) == 7 - int(unreadable) for samples, targets, unreadable in batches)


def test_collate_keeps_mixup_batches_even_and_handles_all_unreadable():
    image = torch.zeros(3, 4, 4)
    samples, targets, unreadable = collate_skipping_unreadable([(image, 0), (None, 1), (image, 2), (image, 3)],
                                                               keep_even=True)
    assert samples.shape[0] == 2 and targets.tolist() == [0, 2] and unreadable.item() == 1
    samples, targets, unreadable = collate_skipping_unreadable([(None, 0), (None, 1)])
    assert samples.numel() == 0 and targets.numel() == 0 and unreadable.item() == 2


def test_strict_data_raises_naming_the_file(tmp_path):
    root = make_image_folder(tmp_path)
    truncated = add_corrupt_files(root)
    train, _ = build_dataset(True, folder_args(root, strict_data=True))
    index = [path for path, _ in train.samples].index(truncated)
    with pytest.raises(UnreadableImageError, match=f"unreadable image file: {re.escape(truncated)}"):
        train[index]


# ----------------------------------------------------------------------------- bad input


def assert_one_line_error(args, is_train, pattern):
    with pytest.raises(DatasetError, match=pattern) as error:
        build_dataset(is_train, args)
    assert "\n" not in str(error.value)


def test_missing_data_folder(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert_one_line_error(folder_args(missing), True, f"data folder not found: {re.escape(missing)}")


def test_empty_data_folder(tmp_path):
    assert_one_line_error(folder_args(tmp_path), True, f"data folder is empty: {re.escape(str(tmp_path))}")


def test_missing_data_path_argument():
    assert_one_line_error(default_data_args(data_set="IMNET"), True, "--data-path is required")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder(tmp_path, split):
    root = make_image_folder(tmp_path)
    os.rename(os.path.join(root, split), os.path.join(root, "moved"))
    assert_one_line_error(folder_args(root), True, f"missing split folder: {re.escape(os.path.join(root, split))}$")


def test_split_without_class_folders(tmp_path):
    root = make_image_folder(tmp_path)
    os.rename(os.path.join(root, "val"), os.path.join(root, "moved"))
    os.makedirs(os.path.join(root, "val"))
    assert_one_line_error(folder_args(root), False, "split folder has no class folders: .*val")


def test_class_folder_without_images(tmp_path):
    root = make_image_folder(tmp_path)
    empty = os.path.join(root, "train", "dog_empty")
    os.makedirs(empty)
    with open(os.path.join(empty, "notes.txt"), "w") as handle:
        handle.write("no images here")
    assert_one_line_error(folder_args(root), True, f"class folder has no images .*: {re.escape(empty)}$")


def test_unknown_data_set_lists_valid_ones(tmp_path):
    assert_one_line_error(folder_args(tmp_path, data_set="IMAGENET"), True,
                          "unknown data set 'IMAGENET'; valid: IMNET, CIFAR, C100, FOLDER, DIGITS, FMNIST")


def test_unknown_subset(tmp_path):
    assert_one_line_error(folder_args(make_image_folder(tmp_path), subset="5PERCENT"), True,
                          "unknown subset '5PERCENT'; valid: 1PERCENT, 10PERCENT, 20PERCENT")


@pytest.mark.parametrize("name", ["CIFAR", "C100"])  # the paper's name, and generation's
def test_cifar_absent_is_a_clear_error_and_never_downloads(tmp_path, name):
    (tmp_path / "readme.txt").write_text("not cifar")
    assert_one_line_error(default_data_args(data_set=name, data_path=str(tmp_path)), True,
                          f"CIFAR-100 not found in {re.escape(str(tmp_path))}.*nothing is downloaded")
    assert os.listdir(tmp_path) == ["readme.txt"]


def test_default_data_args_rejects_unknown_fields():
    with pytest.raises(TypeError, match="unknown data argument"):
        default_data_args(batchsize=3)


# ----------------------------------------------------------------------------- FMNIST (IDX files)


def make_fmnist(folder, compress=True, train_per_class=3, test_per_class=1):
    """Train and t10k IDX files of 28x28 images whose every pixel is 10 x label + index in the class."""
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10), per_class)
        order = [np.sum(labels[:i] == labels[i]) for i in range(len(labels))]
        images = np.stack([np.full((28, 28), 10 * label + k) for label, k in zip(labels, order)])
        images[:, 0, 0] = 255  # one bright corner pixel, to check the resize keeps orientation
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), images, compress)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), labels, compress)
    return str(folder)


def fmnist_args(root, **overrides):
    return default_data_args(**dict(dict(data_set="FMNIST", data_path=str(root), input_size=32, num_workers=0,
                                         pin_mem=False, batch_size=4), **overrides))


@pytest.mark.parametrize("compress", [True, False])
def test_fmnist_reads_debian_folder_gzipped_or_not(tmp_path, compress):
    root = make_fmnist(tmp_path, compress=compress)
    train, num_classes = build_dataset(True, fmnist_args(root))
    test, _ = build_dataset(False, fmnist_args(root, eval_crop_ratio=1.0))
    assert (num_classes, len(train), len(test)) == (10, 30, 10)
    assert train.classes[9] == "Ankle boot" and train.targets[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert train.data.shape == (30, 28, 28) and train.data[13, 5, 5] == 10 * 3 + 1
    sample, target = test[7]  # eval: whole image (ratio 1), bicubic 28 -> 32, gray copied to 3 channels
    assert sample.shape == (3, 32, 32) and target == 7
    assert torch.allclose(sample[0] * 0.229 + 0.485, sample[1] * 0.224 + 0.456, atol=1e-6)  # same gray in R and G
    pixel = (sample[0, 16, 16] * 0.229 + 0.485).item() * 255
    assert abs(pixel - 70) < 1  # flat interior keeps 10 x label + 0
    assert sample[0, 0, 0] > sample[0, 31, 31]  # the bright corner stays top-left


def test_fmnist_reads_torchvision_layout(tmp_path):
    make_fmnist(tmp_path / "FashionMNIST" / "raw", compress=False)
    train, _ = build_dataset(True, fmnist_args(tmp_path))
    assert len(train) == 30


def test_fmnist_goes_through_the_same_transforms_subset_and_loaders(tmp_path):
    root = make_fmnist(tmp_path, train_per_class=10)
    args = fmnist_args(root, subset="20PERCENT", seed=5)
    train, _ = build_dataset(True, args)
    assert np.bincount(train.targets).tolist() == [2] * 10  # class-balanced
    again, _ = build_dataset(True, fmnist_args(root, subset="20PERCENT", seed=9))
    assert np.array_equal(train.data, again.data)  # the same subset for every --seed
    assert train.data.shape == (20, 28, 28) and all(train.data[i, 5, 5] // 10 == t for i, t in enumerate(train.targets))
    assert isinstance(train.transform.transforms[0], transforms.RandomResizedCrop)
    test, _ = build_dataset(False, args)
    train_loader, val_loader = build_loaders(args, train, test, distributed=False, rank=0, world_size=1)
    samples, targets, unreadable = next(iter(train_loader))
    assert samples.shape == (4, 3, 32, 32) and targets.dtype == torch.int64 and unreadable.item() == 0
    assert sum(len(batch[1]) for batch in val_loader) == 10


def test_fmnist_missing_files_name_the_package_and_torchvision(tmp_path):
    assert_one_line_error(fmnist_args(tmp_path), True,
                          f"Fashion-MNIST not found: no train-images-idx3-ubyte.* in {re.escape(str(tmp_path))} "
                          ".*apt-get install dataset-fashion-mnist.*/usr/share/datasets/fashion-mnist.*FashionMNIST/raw")


def test_fmnist_default_folder_is_debians():
    assert datasets.DEFAULT_FMNIST_ROOT == "/usr/share/datasets/fashion-mnist"
    args = default_data_args(data_set="FMNIST", input_size=32)
    if not os.path.isdir(datasets.DEFAULT_FMNIST_ROOT):
        assert_one_line_error(args, False, "no t10k-images-idx3-ubyte.* in /usr/share/datasets/fashion-mnist")


def test_fmnist_bad_files_are_one_line_errors(tmp_path):
    root = make_fmnist(tmp_path, compress=False)
    labels = os.path.join(root, "t10k-labels-idx1-ubyte")
    write_idx(labels, np.arange(9) % 10, compress=False)
    assert_one_line_error(fmnist_args(root), False, "holds 10 images but .*t10k-labels-idx1-ubyte holds 9 labels")
    write_idx(labels, np.full(10, 12), compress=False)
    assert_one_line_error(fmnist_args(root), False, "has label 12; Fashion-MNIST labels lie in 0-9")
    images = os.path.join(root, "t10k-images-idx3-ubyte")
    with open(images, "r+b") as handle:
        handle.truncate(1000)
    assert_one_line_error(fmnist_args(root), False, "holds 984 bytes of data, its header announces 7840 .*truncated")
    with open(images, "wb") as handle:
        handle.write(b"<html>not an idx file</html>")
    assert_one_line_error(fmnist_args(root), False, "not an IDX file of 3-D unsigned bytes: .*t10k-images")
    with open(images + ".gz", "wb") as handle:
        handle.write(b"\x1f\x8b broken gzip")
    os.remove(images)
    assert_one_line_error(fmnist_args(root), False, "cannot read IDX file .*t10k-images-idx3-ubyte.gz")


def test_fmnist_error_exits_2_through_the_entry_point(tmp_path, run_main):
    code, _, err = run_main(["--data-set", "FMNIST", "--data-path", str(tmp_path), "--input-size", "32",
                             "--alpha", "0", "--gamma", "0", "--epochs", "1", "--device", "cpu"])
    assert code == 2
    assert "Fashion-MNIST not found" in err and "apt-get install dataset-fashion-mnist" in err
