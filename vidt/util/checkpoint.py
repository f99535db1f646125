"""Checkpoint files in DETR's form: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}.

Everything is read with ``weights_only=True`` (the repository's ``utils.safe_torch_load``). Released
NAVER/VkD files pickle an ``argparse.Namespace`` under 'args', so that one class is allow-listed; our own
files store args as a plain dict and need no allow-list.
"""
import argparse
import os
import urllib.parse
from typing import Callable, Dict, List

import torch

from vkd.checkpoints import safe_torch_load
from vkd.errors import CheckpointError as CoreCheckpointError

MAX_KEYS_IN_ERROR = 5
RELEASED_FILE_GLOBALS = (argparse.Namespace,)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


def _downloaded(url: str) -> str:
    """The torch hub cache's copy of ``url`` (where load_state_dict_from_url keeps it), downloaded once.

    Loading goes through the local file so that a URL is read exactly as safely as a path.
    """
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path)  # writes a temporary file and renames it: never partial
    return path


def load_checkpoint(path: str) -> dict:
    """Read a local file or an http(s) URL into a dict of tensors and plain values (weights only).

    A missing, corrupt or truncated file, or one whose unpickling could run code, is a one-line
    ``CheckpointError`` naming it.
    """
    if path.startswith(("http://", "https://")):
        path = _downloaded(path)
    try:
        return safe_torch_load(path, allowed_globals=RELEASED_FILE_GLOBALS)
    except CoreCheckpointError as error:
        raise CheckpointError(str(error)) from None


def model_state_from(checkpoint: dict, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path} has no 'model' entry (expected DETR form with 'model', 'args', ...)")
    return checkpoint["model"]


def _name_some(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:MAX_KEYS_IN_ERROR])
    return shown + (f" (+{len(keys) - MAX_KEYS_IN_ERROR} more)" if len(keys) > MAX_KEYS_IN_ERROR else "")


def load_state_dict_strictly(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str,
                             may_start_fresh: Callable[[str], bool] = lambda key: False) -> List[str]:
    """load_state_dict(strict=True), with the missing/unexpected/mismatched keys named on one line.

    Keys of the model for which ``may_start_fresh`` holds may be absent from the file; they keep their
    initial values and are returned.
    """
    expected = model.state_dict()
    fresh = [k for k in expected if k not in state_dict and may_start_fresh(k)]
    missing = [k for k in expected if k not in state_dict and not may_start_fresh(k)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {list(state_dict[k].shape)} vs model {list(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_name_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_name_some(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_name_some(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=not fresh)
    return fresh
