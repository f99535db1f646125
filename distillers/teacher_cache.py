"""The frozen teacher's outputs per input batch, kept on disk and read back bit for bit (``--teacher-cache``):
the rows of an ablation that feed the teacher the same batches run it once."""
import functools
import hashlib
import json
import os
import warnings
from typing import Callable, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from vkd.checkpoints import safe_torch_load, save_atomically
from vkd.errors import CheckpointError, RunFailed
from vkd.losses import features_and_logits
from vkd.runs import cpu_model, require_writable_folder

TeacherOutputs = Tuple[torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=None)
def _device_model(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the instruction set torch's kernels use on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} {cpu_model()} {torch.backends.cpu.get_cpu_capability()}"


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def _content_sha256(outputs: TeacherOutputs) -> str:
    """What an entry stores beside its tensors: a bit flipped on the disk makes the entry a miss, not a hit."""
    digest = hashlib.sha256()
    for tensor in outputs:
        _hash_tensor(digest, tensor)
    return digest.hexdigest()


class TeacherCache:
    """The frozen teacher's (pooled features, logits) of each input batch, stored in ``folder`` under
    ``<key[:2]>/<key>.pt``, key = sha256 of the teacher's identity (its state dict's bytes and ``identity``:
    architecture, input size, memory layout, AMP), of what computes it (torch's version, the thread count, the
    device's model: the last bits of a forward depend on them) and of the batch's bytes. Rows of an ablation that feed the
    teacher the same batches run it once. Entries hold exactly the tensors the teacher returned, so a hit gives
    the numbers of computing, and the SHA-256 of those tensors. Processes may share the folder; an unreadable or
    malformed entry, or one whose tensors no longer match their checksum, is recomputed and rewritten. A folder
    that cannot be written is refused on construction; an entry that cannot be written (a full disk) is not
    stored, with one warning, and the run goes on without storing more.
    ``hits``, ``misses`` and ``bytes_written`` count since ``take_counts``.
    """

    def __init__(self, folder: str, teacher: nn.Module, identity: Mapping[str, object]):
        computed_by = dict(torch=torch.__version__, threads=torch.get_num_threads())
        digest = hashlib.sha256(json.dumps({**identity, **computed_by}, sort_keys=True).encode())
        for name, tensor in teacher.state_dict().items():
            digest.update(name.encode())
            _hash_tensor(digest, tensor)
        require_writable_folder(folder, "--teacher-cache")
        self.folder, self.teacher_digest, self.teacher = folder, digest.digest(), teacher
        self.per_image: Optional[tuple] = None  # (dtype, shape) of one image's features and logits
        self.hits = self.misses = self.bytes_written = 0
        self.storing = True  # False after an entry could not be written (a full disk): no more are tried

    def take_counts(self) -> Tuple[int, int, int]:
        counts = (self.hits, self.misses, self.bytes_written)
        self.hits = self.misses = self.bytes_written = 0
        return counts

    def path(self, samples: torch.Tensor) -> str:
        digest = hashlib.sha256(self.teacher_digest)
        digest.update(_device_model(samples.device).encode())
        _hash_tensor(digest, samples)
        key = digest.hexdigest()
        return os.path.join(self.folder, key[:2], f"{key}.pt")

    def outputs(self, samples: torch.Tensor, teacher: Callable[[torch.Tensor], TeacherOutputs]) -> TeacherOutputs:
        if self.per_image is None:
            # What a valid entry holds, under the caller's autocast: learnt from one image, by the plain teacher
            # (a compiled one would compile for that batch size too).
            self.per_image = tuple((output.dtype, output.shape[1:])
                                   for output in features_and_logits(self.teacher, samples[:1]))
        path = self.path(samples)
        entry = self._load(path, samples.shape[0])
        if entry is not None:
            self.hits += 1
            return tuple(tensor.to(samples.device) for tensor in entry)
        self.misses += 1
        features, logits = teacher(samples)
        if self.storing:
            self._store((features, logits), path)
        return features, logits

    def _store(self, outputs: TeacherOutputs, path: str) -> None:
        # clone: a view (a ViT's class token) would save its whole storage. A concurrent writer of this
        # entry writes the same bytes under its own temporary name; the last rename wins.
        stored = tuple(output.cpu().clone() for output in outputs)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_atomically({"features": stored[0], "logits": stored[1], "sha256": _content_sha256(stored)}, path)
        except (OSError, RunFailed) as error:  # RunFailed: no space left
            # The cache only saves time: losing the run (and its partial epoch) to it would cost more.
            self.storing = False
            reason = error.strerror if isinstance(error, OSError) else "no space left"
            warnings.warn(f"teacher cache {self.folder}: an entry could not be written ({reason}); this run goes on "
                          f"without storing entries (drop --teacher-cache, or free space, for the next runs)")
            return
        self.bytes_written += os.path.getsize(path)

    def _load(self, path: str, batch: int) -> Optional[TeacherOutputs]:
        if not os.path.exists(path):
            return None
        try:
            entry = safe_torch_load(path)
        except CheckpointError:
            return None
        if not isinstance(entry, dict) or not all(isinstance(entry.get(name), torch.Tensor)
                                                  for name in ("features", "logits")):
            return None
        outputs = entry["features"], entry["logits"]
        valid = all(output.shape[:1] == (batch,) and (output.dtype, output.shape[1:]) == expected
                    for output, expected in zip(outputs, self.per_image))
        return outputs if valid and entry.get("sha256") == _content_sha256(outputs) else None
