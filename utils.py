"""Small helpers shared by every entry point: error exits, reproducibility, and safe, strict checkpoint files."""
import glob
import json
import os
import pickle
import platform
import random
import re
import subprocess
import sys
from typing import Dict, Iterable, Mapping, NoReturn, Optional

import numpy as np
import torch
import torch.nn as nn

REPO_DIR = os.path.dirname(os.path.abspath(__file__))

DDP_PREFIX = "module."
PROJECTOR_PREFIX = "projector."
MAX_KEYS_IN_MESSAGE = 5


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe, or of the wrong architecture."""


# torch names what a weights_only load refused as "GLOBAL module.name", e.g. "Unsupported global: GLOBAL
# argparse.Namespace was not an allowed global" or "Trying to load unsupported GLOBAL posix.system whose module
# posix is blocked". Garbage bytes fail in the same UnpicklingError type but without it ("Unsupported operand 87").
REFUSED_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")


def fail(message: str, exit_code: int = 2) -> NoReturn:
    """One line on stderr, then exit: code 2 for bad input (before any long work), 1 for a run that
    cannot go on (a non-finite loss, a dead rank)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Augmentation and mixup randomness of an epoch depend on (seed, rank, epoch) alone, so a resumed
    # run draws the same random numbers as an uninterrupted one.
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def _git(*arguments: str) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", REPO_DIR, *arguments], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_state() -> Dict[str, object]:
    """The commit of this code and whether the working tree differs from it (None outside a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status)}


def cpu_model() -> str:
    """The CPU's model name (the last digits of CPU results depend on it)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_json(path: str, content: dict) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle, indent=1)
        handle.write("\n")


def _load_error(path: str, error: BaseException) -> CheckpointError:
    """One line naming ``path``: a refusal to run code, or an unreadable (corrupt, truncated, foreign) file."""
    refused = REFUSED_GLOBAL.search(str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if refused:
        return CheckpointError(f"refused to load {path}: it refers to {refused.group(1)}, which is neither a tensor "
                               f"nor a plain container, and unpickling it could run code")
    # torch's own text for an UnpicklingError is advice about weights_only, which misleads for a broken file;
    # its other texts go on with generic advice after the first sentence.
    if isinstance(error, pickle.UnpicklingError):
        detail = "unreadable pickle data"
    else:
        detail = first_line(error).split(". ")[0]
    return CheckpointError(f"could not read checkpoint {path}: corrupt, truncated or not a PyTorch file "
                           f"({type(error).__name__}: {detail})")


def safe_torch_load(path: str, allowed_globals: Iterable[type] = ()) -> object:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code.

    ``allowed_globals`` names the extra classes a known file format needs (e.g. argparse.Namespace).
    Every failure is a one-line ``CheckpointError`` naming the file (see ``_load_error``).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    # On malformed bytes torch.load raises a wide, undocumented set of types (UnpicklingError, RuntimeError,
    # KeyError, IndexError, struct.error, AssertionError, UnicodeDecodeError, EOFError...), all seen when
    # loading random and truncated files; none of them means anything but "this file cannot be read".
    except Exception as error:
        raise _load_error(path, error) from None


def load_state_dict_file(path: str, preferred_keys: Iterable[str] = ("student", "model", "state_dict"),
                         allowed_globals: Iterable[type] = ()) -> Dict[str, torch.Tensor]:
    """The state dict inside a file: under the first of ``preferred_keys`` present, else the file itself."""
    content = safe_torch_load(path, allowed_globals)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(content).__name__})")
    for key in preferred_keys:
        if key in content and isinstance(content[key], Mapping):
            content = content[key]
            break
    if not all(isinstance(value, torch.Tensor) for value in content.values()):
        raise CheckpointError(f"{path} holds no state dict under any of {list(preferred_keys)}")
    return dict(content)


def strip_ddp_prefix(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key: value for key, value in state_dict.items()}


def _describe(keys, shapes: Mapping[str, torch.Size]) -> str:
    listed = [f"{key} {list(shapes[key])}" for key in keys[:MAX_KEYS_IN_MESSAGE]]
    more = f" (+{len(keys) - MAX_KEYS_IN_MESSAGE} more)" if len(keys) > MAX_KEYS_IN_MESSAGE else ""
    return ", ".join(listed) + more


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """A description of how ``state_dict`` differs from ``model``'s keys and shapes, or None if it fits."""
    expected = {key: value.shape for key, value in model.state_dict().items()}
    found = {key: value.shape for key, value in state_dict.items()}
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    wrong_shape = [key for key in expected if key in found and expected[key] != found[key]]
    problems = []
    if wrong_shape:
        problems.append("shape mismatch: " + ", ".join(
            f"{key} file {list(found[key])} vs model {list(expected[key])}" for key in wrong_shape[:MAX_KEYS_IN_MESSAGE])
            + (f" (+{len(wrong_shape) - MAX_KEYS_IN_MESSAGE} more)" if len(wrong_shape) > MAX_KEYS_IN_MESSAGE else ""))
    if missing:
        problems.append("missing from file: " + _describe(missing, expected))
    if unexpected:
        problems.append("unexpected in file: " + _describe(unexpected, found))
    return "; ".join(problems) or None


def strict_load(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """``load_state_dict(strict=True)`` with an error that names the first offending keys and shapes."""
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {mismatch}")
    model.load_state_dict(state_dict, strict=True)


def load_student_checkpoint(student: nn.Module, path: str) -> Dict[str, torch.Tensor]:
    """Load a released VkD checkpoint (``'student'`` with ``module.`` keys), one of ours, or a bare state dict.

    Strict: the only keys skipped are ``projector.*`` when the student has no projector (evaluation
    does not need it). Returns the state dict that was loaded.
    """
    state_dict = strip_ddp_prefix(load_state_dict_file(path, preferred_keys=("student", "model", "state_dict")))
    if getattr(student, "projector", None) is None:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith(PROJECTOR_PREFIX)}
    mismatch = state_dict_mismatch(student, state_dict)
    if mismatch:
        hint = _shape_hint(student, state_dict)
        raise CheckpointError(f"{path} does not fit {type(student).__name__}: {mismatch}" + (f"; {hint}" if hint else ""))
    student.load_state_dict(state_dict, strict=True)
    return state_dict


def _shape_hint(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """What a person should change when a file differs from the model only in class count or input size."""
    expected = model.state_dict()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if module is classifier and key in state_dict and key in expected:
            found, wanted = state_dict[key].shape, expected[key].shape
            if found[0] != wanted[0] and found[1:] == wanted[1:]:
                return f"file has {found[0]} classes, data set has {wanted[0]}"
    positions = state_dict.get("pos_embed")
    if (positions is not None and "pos_embed" in expected and positions.ndim == 3
            and positions.shape[1] != expected["pos_embed"].shape[1]
            and positions.shape[2] == expected["pos_embed"].shape[2]):
        # DeiT students: a grid of stride-16 patches after 1 (cls) or 2 (cls, dist) prefix tokens.
        num_patches = getattr(model, "num_patches", None) or model.patch_embed.num_patches
        prefix_tokens = expected["pos_embed"].shape[1] - num_patches
        model_size = getattr(model, "img_size", None) or model.patch_embed.img_size[0]
        stride = model_size // round(num_patches ** 0.5)
        file_size = round((positions.shape[1] - prefix_tokens) ** 0.5) * stride
        return (f"file was trained at input size {file_size}, the model is built for {model_size}: "
                f"pass --input-size {file_size}")
    return None


def add_ddp_prefix(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys as a DDP-wrapped model names them (``module.``), the layout of the released checkpoints."""
    return {DDP_PREFIX + key: value for key, value in state_dict.items()}


def all_finite(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(value).all() for value in state_dict.values() if value.is_floating_point())


def save_atomically(obj: object, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the previous complete file or the new one, never a
    truncated file (os.replace is atomic within one file system).
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.tmp."
    # Temporaries of writers killed mid-save (pre-emption) would otherwise pile up, one checkpoint each.
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*")):
        os.remove(stale)
    temporary = os.path.join(folder, f"{prefix}{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    # Persist the rename itself, so a power loss right after cannot bring back the old entry.
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
