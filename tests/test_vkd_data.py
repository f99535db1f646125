"""vkd.data on its own: the light imports, the one error class, the one source of defaults, subsets,
transforms, in-memory readers and CIFAR's errors (tiny data in tmp_path, CPU, seconds)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from config import build_parser
from vkd import errors
from vkd.data import cifar, digits, fmnist, folders, loaders, subsets
from vkd.data import samplers as data_samplers
from vkd.data.mixup import mixup_active
from vkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_names(pipeline):
    return [type(step).__name__ for step in pipeline.transforms]


def test_the_core_and_the_models_do_not_load_the_data_sets():
    probe = ("import sys, vkd; assert 'vkd.data' not in sys.modules; "
             "import vkd.data.mixup; assert 'torchvision' not in sys.modules and 'PIL' not in sys.modules; "
             "import models.build; assert 'datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True)


def test_one_error_class_and_one_sampler_home():
    assert datasets.DatasetError is errors.DatasetError and issubclass(errors.DatasetError, ValueError)
    assert issubclass(folders.UnreadableImageError, errors.DatasetError) and errors.DatasetError.exit_code == 2
    assert data_samplers.RASampler is loaders.RASampler
    assert datasets.mixup_active is mixup_active


def test_unreadable_image_error_keeps_only_the_workers_last_line():
    rebuilt = folders.UnreadableImageError("Caught UnreadableImageError in DataLoader worker process 0.\n"
                                           "Traceback (most recent call last):\n  ...\n"
                                           "vkd.data.folders.UnreadableImageError: unreadable image file: a.jpg (x)\n")
    assert str(rebuilt) == "unreadable image file: a.jpg (x)"


def test_default_data_args_are_the_command_lines_defaults():
    parsed = build_parser().parse_args([])
    defaults = datasets.default_data_args()
    assert vars(defaults) == vars(datasets.data_args_from(parsed))
    assert (defaults.batch_size, defaults.num_workers, defaults.subset) == (512, parsed.num_workers, None)
    assert datasets.default_data_args(batch_size=8, subset="1PERCENT").batch_size == 8


def test_mixup_is_on_when_any_of_its_three_settings_is():
    def active(mixup=0.0, cutmix=0.0, cutmix_minmax=None):
        return mixup_active(datasets.default_data_args(mixup=mixup, cutmix=cutmix, cutmix_minmax=cutmix_minmax))

    assert not active() and active(mixup=0.8) and active(cutmix=1.0) and active(cutmix_minmax=(0.2, 0.8))


# ----------------------------------------------------------------------------- subsets


def test_uniform_subset_is_kd_dlgans_draw_and_balanced_keeps_every_class():
    uniform = subsets.uniform_subset_indices(200, 0.1, seed=3)
    assert uniform == sorted(np.random.RandomState(3).choice(200, 20, replace=False).tolist())
    assert uniform == [3, 25, 40, 41, 46, 51, 58, 70, 82, 83, 95, 100, 139, 159, 170, 173, 179, 183, 190, 197]
    balanced = subsets.balanced_subset_indices((np.arange(200) % 10).tolist(), 0.1, seed=3)
    assert balanced == [20, 27, 28, 29, 41, 55, 59, 91, 102, 104, 107, 113, 122, 136, 140, 156, 164, 173, 195, 198]


def write_folder(root, per_class=(2, 3)):
    """train/ and val/ of 4x6 PNGs whose every pixel is 10 x class + index."""
    for split in ("train", "val"):
        for label, count in enumerate(per_class):
            os.makedirs(os.path.join(root, split, f"c{label}"))
            for index in range(count):
                pixels = np.full((4, 6, 3), 10 * label + index, dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f"c{label}", f"{index}.png"))
    return str(root)


def test_restrict_keeps_the_type_and_cuts_files_or_arrays(tmp_path):
    folder, _ = folders.build_image_folder(write_folder(tmp_path), True, transform=np.asarray, strict=True)
    subsets.restrict(folder, [1, 4])
    assert type(folder) is folders.ImageFolderSkippingUnreadable and folder.targets == [0, 1]
    assert [os.path.basename(path) for path, _ in folder.imgs] == ["1.png", "2.png"] and folder[1][0][0, 0, 0] == 12
    images = fmnist.IDXImages(np.arange(5, dtype=np.uint8).reshape(5, 1, 1), [0, 1, 0, 1, 0], fmnist.FMNIST_CLASSES,
                              transform=np.asarray)
    subsets.restrict(images, [3, 4])
    assert images.data.ravel().tolist() == [3, 4] and images.targets == [1, 0] and len(images) == 2


# ----------------------------------------------------------------------------- transforms


def test_at_32_px_evaluation_only_fits_the_size():
    small = eval_transform(32, crop_ratio=0.5)
    assert step_names(small) == ["Resize", "ToTensor", "Normalize"] and small.transforms[0].size == (32, 32)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    plain = (torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None])
    assert torch.allclose(small(image), plain / torch.tensor(IMAGENET_STD)[:, None, None], atol=1e-6)
    assert eval_transform(32)(Image.new("RGB", (28, 28))).shape == (3, 32, 32)
    large = eval_transform(64)
    assert step_names(large) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert large.transforms[0].size == 73 and large.transforms[1].size == (64, 64)


def test_train_transform_options():
    simple = train_transform(48, simple_random_crop=True, three_augment=False, color_jitter=0.0)
    assert step_names(simple) == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert simple.transforms[1].padding == 4 and simple.transforms[1].padding_mode == "reflect"
    assert simple(Image.new("RGB", (60, 50))).shape == (3, 48, 48)


# ----------------------------------------------------------------------------- in-memory readers


def test_read_split_arrays_in_class_then_file_order(tmp_path):
    root = write_folder(tmp_path)
    images, labels = folders.read_split_arrays(root, is_train=True)
    assert images.shape == (5, 4, 6, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert images[:, 0, 0, 0].tolist() == [0, 1, 10, 11, 12] and labels.tolist() == [0, 0, 1, 1, 1]
    broken = os.path.join(root, "val", "c1", "9.png")
    with open(broken, "wb") as handle:
        handle.write(b"not a png")
    with pytest.raises(folders.UnreadableImageError, match=f"unreadable image file: {broken}"):
        folders.read_split_arrays(root, is_train=False)


def test_read_digits_holds_the_export_in_memory(tmp_path):
    assert digits.DEFAULT_DIGITS_ROOT == os.path.join(REPO, "data", "digits")
    root = digits.export_digits(str(tmp_path / "digits"))
    train_images, train_labels = digits.read_digits(root, is_train=True)
    val_images, val_labels = digits.read_digits(root, is_train=False)
    assert train_images.shape == (1437, 32, 32, 3) and val_images.shape == (360, 32, 32, 3)
    assert np.bincount(val_labels).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    first_seven = sorted(os.listdir(os.path.join(root, "val", "7")))[0]
    on_disk = np.asarray(Image.open(os.path.join(root, "val", "7", first_seven)))
    assert np.array_equal(val_images[np.flatnonzero(val_labels == 7)[0]], on_disk)


# ----------------------------------------------------------------------------- CIFAR


def test_cifar_errors_name_the_folder_and_never_download(tmp_path):
    with pytest.raises(errors.DatasetError, match="CIFAR-10 needs --data-path: the folder holding cifar-10-batches-py/"):
        cifar.load_cifar(None, 10, is_train=True)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(errors.DatasetError, match=f"CIFAR-100 data folder not found: {missing} "):
        cifar.load_cifar(missing, 100, is_train=False)
    with pytest.raises(errors.DatasetError, match=f"CIFAR-100 not found in {tmp_path}: expected cifar-100-python/.*"
                                                  "nothing is downloaded") as error:
        cifar.load_cifar(str(tmp_path), 100, is_train=True)
    assert "\n" not in str(error.value) and os.listdir(tmp_path) == []
