"""CIFAR-10 and CIFAR-100 in torchvision's layout (the python version), downloaded by torchvision on request."""
import contextlib
import http.client
import os
import shutil
import tempfile
from typing import Callable, Optional

from torchvision.datasets import CIFAR10, CIFAR100

from vkd import downloads
from vkd.checkpoints import first_line
from vkd.errors import DatasetError

CIFAR_VERSIONS = {10: (CIFAR10, "cifar-10-batches-py"), 100: (CIFAR100, "cifar-100-python")}


def download_cifar(root: str, num_classes: int) -> None:
    """Fetch CIFAR-``num_classes`` with torchvision (its URL, its archive checksum) into ``root``.

    Downloaded and unpacked in a scratch folder under ``root``, then renamed into place, so processes
    downloading at once (one per GPU) never read a half-written folder.
    """
    dataset_class, folder = CIFAR_VERSIONS[num_classes]
    cannot = f"could not download CIFAR-{num_classes} from {dataset_class.url}"
    instead = f"put {folder}/ (torchvision's layout) under --data-path yourself"
    if not downloads.reachable(dataset_class.url):
        raise DatasetError(f"{cannot} (the server cannot be reached); {instead}")
    try:
        os.makedirs(root, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".download-", dir=root)
    except OSError as error:  # a folder that cannot be written
        raise DatasetError(f"{cannot} into {root} ({first_line(error)}); {instead}") from None
    try:
        dataset_class(scratch, train=False, download=True)
        with contextlib.suppress(OSError):  # a copy already there (another process's): the load that follows checks it
            os.rename(os.path.join(scratch, folder), os.path.join(root, folder))
    # urllib's URLError, HTTPError and timeouts are OSErrors; torchvision raises RuntimeError for an archive
    # failing its checksum.
    except (OSError, http.client.HTTPException, RuntimeError) as error:
        raise DatasetError(f"{cannot} ({first_line(error)}); {instead}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_cifar(root: Optional[str], num_classes: int, is_train: bool, transform: Optional[Callable] = None,
               download: bool = False) -> CIFAR10:
    """The train or test split of CIFAR-``num_classes`` (10 or 100) under ``root``: torchvision's data set,
    ``.data`` uint8 [N, 32, 32, 3] and ``.targets``, whose images go through ``transform`` when read.

    With ``download``, a copy missing from ``root`` is fetched first (``download_cifar``)."""
    dataset_class, folder = CIFAR_VERSIONS[num_classes]
    if not root:
        raise DatasetError(f"CIFAR-{num_classes} needs --data-path: the folder holding {folder}/ (torchvision's "
                           f"layout), or the folder to download it into with --download")
    if not download and not os.path.isdir(root):
        raise DatasetError(f"CIFAR-{num_classes} data folder not found: {root} (pass --data-path the folder "
                           f"holding {folder}/, or add --download to fetch it there)")
    try:
        return dataset_class(root, train=is_train, transform=transform, download=False)
    except RuntimeError:
        # torchvision's only error here: a file missing or failing its checksum.
        if not download:
            raise DatasetError(f"CIFAR-{num_classes} not found in {root}: expected {folder}/ as torchvision writes "
                               f"it (the python version), with intact files; nothing is downloaded without "
                               f"--download") from None
    download_cifar(root, num_classes)
    try:
        return dataset_class(root, train=is_train, transform=transform, download=False)
    except RuntimeError:
        raise DatasetError(f"CIFAR-{num_classes} in {os.path.join(root, folder)} is incomplete or corrupted: "
                           f"remove that folder and run again with --download") from None
