"""The classification criterion: cross-entropy on the cls head, VkD's logit term on the dist head and its
feature term on the projected student, with the frozen teacher owned here (DeiT's ``DistillationLoss`` shape),
so the training loop is the same with and without distillation. The terms themselves live in ``vkd``.
"""
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from distillers.teacher_cache import TeacherCache, TeacherOutputs
from vkd.losses import feature_distillation_loss, features_and_logits, get_feature_loss, logit_distillation_loss
from vkd.norms import get_normalisation


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
