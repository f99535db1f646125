"""Checkpoint files in DETR's form: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'} (ours add 'world_size'),
the run folder they go to, their names, and how they are read.

Everything is read with ``weights_only=True`` (``vkd.checkpoints.safe_torch_load``). Released NAVER/VkD
files pickle an ``argparse.Namespace`` under 'args', so that one class is allow-listed; our own files
store args as a plain dict and need no allow-list.
"""
import argparse
import os
import urllib.parse
from typing import Dict

import torch

from vkd.checkpoints import file_sha256, first_line, safe_torch_load
from vkd.downloads import reachable
from vkd.errors import CheckpointError
from vkd.saver import CheckpointSaver

RELEASED_FILE_GLOBALS = (argparse.Namespace,)
LATEST = "checkpoint.pth"  # DETR's name, rewritten every epoch
EXTRA_CHECKPOINT_EVERY = 100  # besides every --lr_drop epochs, as in the original


def run_folder(args) -> str:
    """logs/<--output_dir>, or the original's name for the run when it is empty (an absolute path stays as it is)."""
    name = args.output_dir or f"{args.method}-{args.backbone_name.upper()}-batch-{args.batch_size}-epoch-{args.epochs}"
    return os.path.join("logs", name)


def checkpoint_saver(args, is_main: bool = True) -> CheckpointSaver:
    """Detection's files (``vkd.saver``) in the run folder: checkpoint.pth every epoch, and checkpointNNNN.pth (NNNN
    the epoch's index) every --lr_drop and every 100 epochs, as in the original."""
    return CheckpointSaver(run_folder(args), LATEST, kept="checkpoint{last:04}.pth",
                           keep_every=(args.lr_drop, EXTRA_CHECKPOINT_EVERY), is_main=is_main)


def _downloaded(url: str, flag: str) -> str:
    """The torch hub cache's copy of ``url`` (where load_state_dict_from_url keeps it), downloaded once, its
    SHA-256 printed so a run's log says which file it used.

    Loading goes through the local file so that a URL is read exactly as safely as a path.
    """
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(path):
        local_instead = f"download it elsewhere and pass the file to {flag}"
        if not reachable(url):
            raise CheckpointError(f"cannot reach {urllib.parse.urlparse(url).hostname} to download {url} "
                                  f"(no network?): {local_instead}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path)  # writes a temporary file and renames it: never partial
        except OSError as error:  # urllib's URLError and HTTPError are OSErrors
            raise CheckpointError(f"could not download {url}: {first_line(error)}; {local_instead}") from None
    print(f"| {url}: {path} (sha256 {file_sha256(path)})", flush=True)
    return path


def load_checkpoint(path: str, flag: str = "the flag") -> dict:
    """Read a local file or an http(s) URL (given to ``flag``) into a dict of tensors and plain values
    (weights only).

    A missing, corrupt or truncated file, or one whose unpickling could run code, is a one-line
    ``CheckpointError`` naming it; so is a URL that cannot be fetched, within seconds without a network.
    """
    if path.startswith(("http://", "https://")):
        path = _downloaded(path, flag)
    return safe_torch_load(path, allowed_globals=RELEASED_FILE_GLOBALS)


def model_state_from(checkpoint: dict, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path} has no 'model' entry (expected DETR form with 'model', 'args', ...)")
    return checkpoint["model"]
