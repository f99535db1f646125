"""Checkpoint files in DETR's form: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}.

Everything is read with ``weights_only=True``. Released NAVER/VkD files pickle an
``argparse.Namespace`` under 'args', so that one class is allow-listed; our own files store args as
a plain dict and need no allow-list.
"""
import argparse
import os
from typing import Dict

import torch

MAX_KEYS_IN_ERROR = 5


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line."""


def load_checkpoint(path: str) -> dict:
    """Read a local file or an http(s) URL into a dict of tensors and plain values (weights only)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        if path.startswith(("http://", "https://")):
            return torch.hub.load_state_dict_from_url(path, map_location="cpu", check_hash=False,
                                                      weights_only=True)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint not found: {path}")
        return torch.load(path, map_location="cpu", weights_only=True)


def model_state_from(checkpoint: dict, path: str) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path} has no 'model' entry (expected DETR form with 'model', 'args', ...)")
    return checkpoint["model"]


def _name_some(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:MAX_KEYS_IN_ERROR])
    return shown + (f" (+{len(keys) - MAX_KEYS_IN_ERROR} more)" if len(keys) > MAX_KEYS_IN_ERROR else "")


def load_state_dict_strictly(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), with the missing/unexpected/mismatched keys named on one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
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
    model.load_state_dict(state_dict, strict=True)


def save_checkpoint(checkpoint: dict, path: str) -> None:
    """Write to a temporary file and rename, so an interrupted save never leaves a truncated file."""
    tmp_path = path + ".tmp"
    torch.save(checkpoint, tmp_path)
    os.replace(tmp_path, path)
