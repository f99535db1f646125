"""The classification criterion: cross-entropy on the cls head, VkD's logit term on the dist head and its
feature term on the projected student, with the frozen teacher owned here (DeiT's ``DistillationLoss`` shape),
so the training loop is the same with and without distillation. The terms themselves live in ``vkd``.
"""
import functools
import hashlib
import json
import os
import time
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from vkd.checkpoints import safe_torch_load, save_atomically
from vkd.errors import CheckpointError
from vkd.losses import feature_distillation_loss, features_and_logits, get_feature_loss, logit_distillation_loss
from vkd.norms import get_normalisation
from vkd.runs import cpu_model

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


class TeacherCache:
    """The frozen teacher's (pooled features, logits) of each input batch, stored in ``folder`` under
    ``<key[:2]>/<key>.pt``, key = sha256 of the teacher's identity (its state dict's bytes and ``identity``:
    architecture, input size, memory layout, AMP), of what computes it (torch's version, the thread count, the
    device's model: the last bits of a forward depend on them) and of the batch's bytes. Rows of an ablation that feed the
    teacher the same batches run it once. Entries hold exactly the tensors the teacher returned, so a hit gives
    the numbers of computing. Processes may share the folder; an unreadable or malformed entry is recomputed
    and rewritten. ``hits``, ``misses`` and ``bytes_written`` count since ``take_counts``.
    """

    def __init__(self, folder: str, teacher: nn.Module, identity: Mapping[str, object]):
        computed_by = dict(torch=torch.__version__, threads=torch.get_num_threads())
        digest = hashlib.sha256(json.dumps({**identity, **computed_by}, sort_keys=True).encode())
        for name, tensor in teacher.state_dict().items():
            digest.update(name.encode())
            _hash_tensor(digest, tensor)
        self.folder, self.teacher_digest, self.teacher = folder, digest.digest(), teacher
        self.per_image: Optional[tuple] = None  # (dtype, shape) of one image's features and logits
        self.hits = self.misses = self.bytes_written = 0

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
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # clone: a view (a ViT's class token) would save its whole storage. A concurrent writer of this
        # entry writes the same bytes under its own temporary name; the last rename wins.
        save_atomically({"features": features.cpu().clone(), "logits": logits.cpu().clone()}, path)
        self.bytes_written += os.path.getsize(path)
        return features, logits

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
        return outputs if valid else None


class VkDLoss(nn.Module):
    """Cross-entropy on the cls head + logit KD on the dist head + VkD feature distillation.

    Like DeiT's ``DistillationLoss`` it owns the frozen teacher, so the training loop is the same
    with and without distillation. Called as ``criterion(samples, outputs, targets)`` where
    ``outputs`` is the student's train-mode output: ``(cls_logits, dist_logits)`` or, when the
    student was asked ``with_projection=True``, ``(cls_logits, dist_logits, projected_features)``;
    a bare logits tensor (a non-distilled student, or a teacher being trained) allows only CE.
    Returns a dict of already-weighted terms ``ce``, ``kd`` (gamma), ``vkd`` (alpha) and their sum
    ``loss``. With alpha = gamma = 0 the teacher is never run.

    Parameters:
        teacher: timm model, frozen here (eval mode, no grad); may be None when alpha = gamma = 0.
        base_criterion: CE on the cls head (SoftTargetCrossEntropy under mixup, else label smoothing).
        alpha: weight of the feature term. gamma: weight of the KL term. temperature: KL temperature.
        normalisation: teacher feature normalisation ('layernorm' for classification).
        feature_loss: 'smooth_l1' (the paper) or 'mse'.
        teacher_cache: where the teacher's outputs are looked up before running it (None: always run it).
        compile_backend: torch.compile the teacher's forward with this backend (None: not compiled); the first
            call, which compiles, logs its time through ``log``.
    """

    def __init__(self, teacher: Optional[nn.Module], base_criterion: nn.Module, alpha: float = 1.0,
                 gamma: float = 1.0, temperature: float = 1.0, normalisation: str = "layernorm",
                 feature_loss: str = "smooth_l1", teacher_cache: Optional[TeacherCache] = None,
                 compile_backend: Optional[str] = None, log: Callable[[str], None] = print):
        super().__init__()
        if (alpha > 0 or gamma > 0) and teacher is None:
            raise ValueError("distillation (alpha > 0 or gamma > 0) needs a teacher")
        get_normalisation(normalisation)  # unknown names fail here, not at the first step
        get_feature_loss(feature_loss)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.base_criterion = base_criterion
        self.alpha, self.gamma, self.temperature = alpha, gamma, temperature
        self.normalisation, self.feature_loss = normalisation, feature_loss
        self.teacher_cache = teacher_cache
        self.compile_backend, self.log = compile_backend, log
        self.compiled_teacher = None
        if compile_backend is not None and teacher is not None:
            self.compiled_teacher = torch.compile(lambda images: features_and_logits(self.teacher, images),
                                                  backend=compile_backend)
        self.compile_seconds: Optional[float] = None

    @property
    def needs_student_features(self) -> bool:
        return self.alpha > 0

    def train(self, mode: bool = True):
        # The teacher stays in eval mode whatever the criterion's mode (BN statistics frozen).
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def teacher_outputs(self, images: torch.Tensor) -> TeacherOutputs:
        if self.compiled_teacher is None:
            return features_and_logits(self.teacher, images)
        if self.compile_seconds is not None:
            return self.compiled_teacher(images)
        start = time.perf_counter()
        outputs = self.compiled_teacher(images)
        self.compile_seconds = time.perf_counter() - start
        self.log(f"Teacher compiled with torch.compile (backend {self.compile_backend}) in {self.compile_seconds:.1f} s")
        return outputs

    def forward(self, samples: torch.Tensor, outputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        if isinstance(outputs, torch.Tensor):
            if self.alpha > 0 or self.gamma > 0:
                raise ValueError("distillation needs a distilled student's (cls_logits, dist_logits) outputs")
            outputs = (outputs, None)
        cls_logits, dist_logits = outputs[0], outputs[1]
        zero = cls_logits.new_zeros(()).float()
        terms = {"ce": self.base_criterion(cls_logits, targets), "kd": zero, "vkd": zero}
        if self.alpha > 0 or self.gamma > 0:
            with torch.no_grad():
                if self.teacher_cache is None:
                    teacher_features, teacher_logits = self.teacher_outputs(samples)
                else:
                    teacher_features, teacher_logits = self.teacher_cache.outputs(samples, self.teacher_outputs)
            if self.gamma > 0:
                terms["kd"] = self.gamma * logit_distillation_loss(dist_logits, teacher_logits, self.temperature)
            if self.alpha > 0:
                if len(outputs) < 3:
                    raise ValueError("alpha > 0 needs the student's projected features: call it with with_projection=True")
                terms["vkd"] = self.alpha * feature_distillation_loss(
                    outputs[2], teacher_features, self.normalisation, self.feature_loss)
        terms["loss"] = terms["ce"] + terms["kd"] + terms["vkd"]
        return terms
