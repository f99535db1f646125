"""Checkpoint files: loading that never runs code (``weights_only=True``), strict state-dict loading whose
error names the offending keys and shapes, atomic saving, and the DDP key prefix of the released files."""
import glob
import hashlib
import os
import pickle
import re
import socket
import time
import uuid
import warnings
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn as nn

from vkd.errors import OUT_OF_SPACE, BadInput, CheckpointError, RunFailed

DDP_PREFIX = "module."
MAX_KEYS_IN_MESSAGE = 5
ABANDONED_AFTER_S = 600.0  # another machine's temporary that has not grown this long is left over
_HOST = socket.gethostname().replace(".", "-")  # temporaries are named <file>.tmp.<host>.<pid>.<random>


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# torch names what a weights_only load refused as "GLOBAL module.name", e.g. "Unsupported global: GLOBAL
# argparse.Namespace was not an allowed global" or "Trying to load unsupported GLOBAL posix.system whose module
# posix is blocked". Garbage bytes fail in the same UnpicklingError type but without it ("Unsupported operand 87").
REFUSED_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")


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
        with torch.serialization.safe_globals(list(allowed_globals)), warnings.catch_warnings():
            # A raw pickle (pickle.dump, torch.save's legacy format) gets a two-line warning about its pickle
            # protocol; the load succeeds or ends in one line here, which is all a person needs.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    # On malformed bytes torch.load raises a wide, undocumented set of types (UnpicklingError, RuntimeError,
    # KeyError, IndexError, struct.error, AssertionError, UnicodeDecodeError, EOFError...), all seen when
    # loading random and truncated files; none of them means anything but "this file cannot be read".
    except Exception as error:
        raise _load_error(path, error) from None


def load_state_dict_file(path: str, preferred_keys: Iterable[str] = ("student", "model", "state_dict"),
                         allowed_globals: Iterable[type] = ()) -> Dict[str, torch.Tensor]:
    """The state dict inside a file: under the first of ``preferred_keys`` present, else the file itself."""
    return state_dict_in(safe_torch_load(path, allowed_globals), path, preferred_keys)


def state_dict_in(content: object, path: str,
                  preferred_keys: Iterable[str] = ("student", "model", "state_dict")) -> Dict[str, torch.Tensor]:
    """``load_state_dict_file`` on ``content``, what ``safe_torch_load(path)`` returned: for a caller that also
    reads other parts of the file and loads it once."""
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


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                        may_be_missing: Iterable[str] = ()) -> Optional[str]:
    """A description of how ``state_dict`` differs from ``model``'s keys and shapes, or None if it fits."""
    expected = {key: value.shape for key, value in model.state_dict().items()}
    found = {key: value.shape for key, value in state_dict.items()}
    missing = [key for key in expected if key not in found and key not in set(may_be_missing)]
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


def strict_load(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                may_start_fresh: Callable[[str], bool] = lambda key: False,
                hint: Callable[[nn.Module, Mapping[str, torch.Tensor]], Optional[str]] = lambda model, state: None
                ) -> List[str]:
    """``load_state_dict(strict=True)`` with an error that names the first offending keys and shapes.

    Keys of the model for which ``may_start_fresh`` holds may be absent from the file: they keep their
    initial values and are returned. ``hint`` may add what a person should change (e.g. the input size).
    """
    fresh = [key for key in model.state_dict() if key not in state_dict and may_start_fresh(key)]
    mismatch = state_dict_mismatch(model, state_dict, may_be_missing=fresh)
    if mismatch:
        advice = hint(model, state_dict)
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {mismatch}"
                              + (f"; {advice}" if advice else ""))
    model.load_state_dict(state_dict, strict=not fresh)
    return fresh


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
        if _abandoned(stale):
            os.remove(stale)
    # One name per writer: several processes may save the same file (a shared teacher cache).
    temporary = os.path.join(folder, f"{prefix}{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        if not _out_of_space(error):
            raise
        free = _free_bytes(folder)
        raise RunFailed(f"no space left in {folder} to write {os.path.basename(path)} ({free / 2 ** 20:.0f} MiB free); "
                        f"the previous {os.path.basename(path)} was kept: free space, then resume") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    # Persist the rename itself, so a power loss right after cannot bring back the old entry.
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _abandoned(temporary: str) -> bool:
    """A temporary whose writer is gone: on the same host, its process no longer runs; from another host
    (a shared file system), it has not grown for ``ABANDONED_AFTER_S``."""
    fields = os.path.basename(temporary).rsplit(".tmp.", 1)[-1].split(".")
    host, pid = (fields[0], fields[1]) if len(fields) >= 3 else ("", "")
    try:
        if host == _HOST:
            return not (pid.isdigit() and _process_runs(int(pid)))
        return time.time() - os.path.getmtime(temporary) > ABANDONED_AFTER_S
    except FileNotFoundError:  # its writer just renamed or removed it
        return False


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _out_of_space(error: BaseException) -> bool:
    # torch.save reports a full disk as its own RuntimeError ("unexpected pos ..."), with the ENOSPC OSError
    # only in the chain; a plain write reports it directly.
    while error is not None:
        if isinstance(error, OSError) and error.errno in OUT_OF_SPACE:
            return True
        error = error.__cause__ or error.__context__
    return False


def _free_bytes(folder: str) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def require_room_for_checkpoints(folder: str, state_bytes: int, copies: int = 2) -> None:
    """Refuse to start a run whose folder cannot hold ``copies`` checkpoints of ``state_bytes`` each: the
    atomic save needs the new file beside the old one, so a full disk is found now, not after an epoch."""
    free, needed = _free_bytes(folder), copies * state_bytes
    if free < needed:
        raise BadInput(f"{folder} has {free / 2 ** 20:.0f} MiB free, and the run needs {needed / 2 ** 20:.0f} MiB for "
                       f"{copies} checkpoints of {state_bytes / 2 ** 20:.0f} MiB: free space or choose another folder")


def tensor_bytes(*state_dicts: Mapping[str, torch.Tensor]) -> int:
    """The bytes of every tensor in ``state_dicts`` (nested dicts and lists, as optimizer states, included)."""
    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, Mapping):
            return sum(size(item) for item in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(item) for item in value)
        return 0
    return sum(size(state) for state in state_dicts)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def classifier_weight_key(model: nn.Module) -> Optional[str]:
    """The state-dict key of ``model``'s classifier weight (``head.weight``, ``fc.weight``, ...), found through
    timm's ``get_classifier``; None for a model without one."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for module_name, module in model.named_modules():
        if module is classifier and isinstance(getattr(module, "weight", None), torch.Tensor):
            return f"{module_name}.weight"
    return None
