"""Checkpoint files in DETR's form: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}.

Everything is read with ``weights_only=True`` (``vkd.checkpoints.safe_torch_load``). Released NAVER/VkD
files pickle an ``argparse.Namespace`` under 'args', so that one class is allow-listed; our own files
store args as a plain dict and need no allow-list.
"""
import argparse
import os
import urllib.parse
from typing import Dict

import torch

from vkd.checkpoints import first_line, safe_torch_load
from vkd.errors import CheckpointError

RELEASED_FILE_GLOBALS = (argparse.Namespace,)


def _downloaded(url: str) -> str:
    """The torch hub cache's copy of ``url`` (where load_state_dict_from_url keeps it), downloaded once.

    Loading goes through the local file so that a URL is read exactly as safely as a path.
    """
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path)  # writes a temporary file and renames it: never partial
        except OSError as error:  # urllib's URLError and HTTPError are OSErrors
            raise CheckpointError(f"could not download {url}: {first_line(error)}") from None
    return path


def load_checkpoint(path: str) -> dict:
    """Read a local file or an http(s) URL into a dict of tensors and plain values (weights only).

    A missing, corrupt or truncated file, or one whose unpickling could run code, is a one-line
    ``CheckpointError`` naming it.
    """
    if path.startswith(("http://", "https://")):
        path = _downloaded(path)
    return safe_torch_load(path, allowed_globals=RELEASED_FILE_GLOBALS)


def model_state_from(checkpoint: dict, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path} has no 'model' entry (expected DETR form with 'model', 'args', ...)")
    return checkpoint["model"]
