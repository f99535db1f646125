"""The training transform (DeiT's three-augment) and the evaluation transform, both ending in ImageNet normalisation."""
import random
from typing import Callable, List

from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import (
    CenterCrop,
    ColorJitter,
    Compose,
    Grayscale,
    InterpolationMode,
    Normalize,
    RandomChoice,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875
SMALL_INPUT_SIZE = 32  # at or below it, evaluation neither resizes nor crops (the original's rule)


class GrayScale:
    """Grayscale kept as 3 channels (DeiT's three-augment ``gray_scale`` with p=1)."""

    def __init__(self):
        self.to_gray = Grayscale(num_output_channels=3)

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
    return [ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def train_transform(input_size: int, simple_random_crop: bool = False, crop_scale_min: float = 0.08,
                    three_augment: bool = True, color_jitter: float = 0.3) -> Compose:
    """The original's effective training pipeline: DeiT three-augment.

    The original also parsed RandAugment and random-erasing flags but never applied them; this is the
    pipeline it actually trained with. ``simple_random_crop`` (DeiT's ``--src``) resizes and takes a
    padded random crop instead of RandomResizedCrop; ``crop_scale_min`` (0.08, as the original) exists
    so that tiny images (32 px digits) can keep more of the object per crop; ``three_augment`` is the
    random choice of grayscale, solarize or blur; ``color_jitter`` 0 turns the jitter off.
    """
    bicubic = InterpolationMode.BICUBIC
    if simple_random_crop:
        geometric = [Resize(input_size, interpolation=bicubic),
                     RandomCrop(input_size, padding=4, padding_mode="reflect")]
    else:
        geometric = [RandomResizedCrop(input_size, scale=(crop_scale_min, 1.0), interpolation=bicubic)]
    pipeline = geometric + [RandomHorizontalFlip()]
    if three_augment:
        pipeline.append(RandomChoice([GrayScale(), Solarization(), GaussianBlur()]))
    if color_jitter:
        pipeline.append(ColorJitter(color_jitter, color_jitter, color_jitter))
    return Compose(pipeline + _normalise())


def eval_transform(input_size: int, crop_ratio: float = EVAL_CROP_RATIO) -> Compose:
    """Resize to ``input_size / crop_ratio`` (0.875: 224 -> 256), centre crop, normalise.

    Inputs of ``SMALL_INPUT_SIZE`` or less are evaluated as they are, with no resize and no centre
    crop, as in the original (and DeiT); ``crop_ratio`` then has no effect.
    """
    bicubic = InterpolationMode.BICUBIC
    if input_size <= SMALL_INPUT_SIZE:
        # Resizing to exactly (size, size) is the identity on such images and only changes images of
        # another size (28 px Fashion-MNIST), which would not fit the model otherwise.
        return Compose([Resize((input_size, input_size), interpolation=bicubic)] + _normalise())
    return Compose([Resize(int(input_size / crop_ratio), interpolation=bicubic),
                               CenterCrop(input_size)] + _normalise())
