"""scikit-learn's 8x8 handwritten digits, exported once as an ImageFolder (``train/`` and ``val/``).

32 px = 4x nearest-neighbour upscaling of the 8x8 originals: every stored pixel is an original value,
so the files hold exactly scikit-learn's data (each original pixel is a 4x4 block) and no interpolation
detail is invented; the bicubic resizing of the classification transforms smooths the block edges
afterwards. 32 is also a multiple of the students' total stride of 16 (2x2 tokens at input 32) and
generation's image size. RGB because the ImageNet pipeline (ColorJitter, 3-channel Normalize,
3-channel stem) expects it.
"""
import json
import os
import shutil
import tempfile
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from vkd.data.folders import read_split_arrays
from vkd.errors import DatasetError

DIGITS_IMAGE_SIZE = 32
DIGITS_CLASSES = 10
DIGITS_VAL_FRACTION = 0.2
# Fixed, independent of --seed: every run of every seed must see the same train/val split.
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16  # load_digits() pixel values lie in [0, 16]
DIGITS_MANIFEST = "export_complete.json"
# The checkout's data/digits: vkd/ sits at the repository root, beside data/.
DEFAULT_DIGITS_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                   "data", "digits")


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
        counts[split] = {str(label): 0 for label in range(DIGITS_CLASSES)}
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

    The split (80/20, stratified, seed 0) and the images (see the module docstring) are fixed; a
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


def read_digits(root: Optional[str], is_train: bool) -> Tuple[np.ndarray, np.ndarray]:
    """One split of the export at ``root`` (default ``DEFAULT_DIGITS_ROOT``, exported if absent) in memory:
    images uint8 [N, 32, 32, 3] and labels int64 [N]; the held-out split is ``val/``."""
    return read_split_arrays(export_digits(root or DEFAULT_DIGITS_ROOT), is_train)
