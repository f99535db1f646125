"""VkD losses: the orthogonal projector, teacher feature normalisations and the distillation criterion.

Paper: Miles, Elezi, Deng, "VkD: Improving Knowledge Distillation using Orthogonal Projections",
CVPR 2024. The student feature is mapped to the teacher's width by a bias-free linear map with
orthonormal columns (so it cannot absorb knowledge), the teacher feature is normalised in a
task-specific way, and the two are compared with smooth-L1 (the paper, section 3).
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import orthogonal_maps

WHITEN_EPS = 1e-5


class OrthogonalProjector(nn.Linear):
    """Bias-free linear map ``in_dim -> out_dim`` whose weight W [out_dim, in_dim] has orthonormal columns.

    The state dict is the original's (``parametrizations.weight.original`` [out, in] and the buffer
    ``parametrizations.weight.0.base`` [out, out]); W is computed from them as
    ``torch.nn.utils.parametrizations.orthogonal`` computes it, with dynamic trivialization
    (W = base @ Q(original)). ``orthogonal_map`` defaults to torch's choice for the shape
    (Householder when non-square, matrix_exp when square); ``impl='torch'`` uses torch's own
    parametrization.
    """

    def __init__(self, in_dim: int, out_dim: int, orthogonal_map: Optional[str] = None, impl: str = "fast"):
        if out_dim < in_dim:
            raise ValueError(f"OrthogonalProjector needs out_dim >= in_dim for orthonormal columns, got {in_dim}->{out_dim}")
        super().__init__(in_dim, out_dim, bias=False)
        orthogonal_maps.register_orthogonal(self, orthogonal_map=orthogonal_map, impl=impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Never forms W for a batch smaller than the width (see orthogonal_maps.orthogonal_linear).
        return orthogonal_maps.orthogonal_linear(self, x)


class OrthogonalLinear(nn.Module):
    """Detection projector (the original ViDT distillation code): orthogonal map, then a per-channel scale and bias."""

    def __init__(self, in_dim: int, out_dim: int, orthogonal_map: Optional[str] = None, impl: str = "fast"):
        super().__init__()
        self.projector = OrthogonalProjector(in_dim, out_dim, orthogonal_map=orthogonal_map, impl=impl)
        self.weight = nn.Parameter(torch.ones(out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x) * self.weight + self.bias


# ---------------------------------------------------------------------------------------------
# Feature normalisations (applied to the teacher in classification; to both sides in detection)
# ---------------------------------------------------------------------------------------------

def layernorm(x: torch.Tensor) -> torch.Tensor:
    """Standardise each row across its features (LayerNorm without affine, eps 1e-5): classification."""
    return F.layer_norm(x, (x.shape[-1],))


def batch_standardise(x: torch.Tensor) -> torch.Tensor:
    """Standardise each feature across the rows of a 2-D batch (unbiased std, no epsilon): detection."""
    return (x - x.mean(0)) / x.std(0)


def whiten(x: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """ZCA-whiten a 2-D batch: centred rows times C^-1/2 of the (biased) feature covariance C + eps*I.

    ``eps`` keeps C invertible when the batch has fewer rows than features (the usual case for
    3024-d teacher features), so rank-deficient directions are scaled by 1/sqrt(eps) at most.
    """
    centred = x - x.mean(0)
    cov = centred.T.float() @ centred.float() / x.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(cov + eps * torch.eye(cov.shape[0], device=x.device))
    inv_sqrt = eigvecs @ torch.diag(eigvals.clamp_min(eps).rsqrt()) @ eigvecs.T
    return (centred.float() @ inv_sqrt).to(x.dtype)


def whiten_cholesky(x: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """Whiten a 2-D batch as htdt's ``Whitening1d`` (Ermolov et al. 2021): (x - mean) L^-T, where
    L L^T = (1 - eps) C + eps I and C is the unbiased feature covariance.

    Same whitened covariance as ``whiten`` up to a rotation. ``eps`` > 0 is what makes the Cholesky
    factor exist when the batch has fewer rows than features; the factorisation runs in float64
    because C then has eigenvalues down to 0 and float32 loses positive definiteness.
    """
    centred = (x - x.mean(0)).double()
    cov = centred.T @ centred / (x.shape[0] - 1)
    shrunk = (1 - eps) * cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=x.device)
    lower = torch.linalg.cholesky(shrunk)
    # Row-vector batch: solve L W^T = centred^T, i.e. W = centred L^-T.
    whitened = torch.linalg.solve_triangular(lower, centred.T, upper=False).T
    return whitened.to(x.dtype)


NORMALISATIONS = {
    "layernorm": layernorm,
    "batchstd": batch_standardise,
    "whiten": whiten,
    "none": lambda x: x,
}

FEATURE_LOSSES = {
    "smooth_l1": F.smooth_l1_loss,
    "mse": F.mse_loss,
}


def get_normalisation(name: str):
    if name not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation '{name}'; choose from {sorted(NORMALISATIONS)}")
    return NORMALISATIONS[name]


def get_feature_loss(name: str):
    if name not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature loss '{name}'; choose from {sorted(FEATURE_LOSSES)}")
    return FEATURE_LOSSES[name]


def feature_distillation_loss(projected_student: torch.Tensor, teacher: torch.Tensor,
                              normalisation: str = "layernorm", loss: str = "smooth_l1") -> torch.Tensor:
    """VkD's feature term: distance between the projected student and the normalised (detached) teacher."""
    distance = get_feature_loss(loss)
    target = get_normalisation(normalisation)(teacher.detach().float())
    return distance(projected_student.float(), target)


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, batch mean, times T^2 (Hinton et al.)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature ** 2


def teacher_outputs(teacher: nn.Module, samples: torch.Tensor):
    """(pooled features, logits) of a timm teacher; for RegNetY-160 the pooling is the spatial mean."""
    features = teacher.forward_features(samples)
    pooled = teacher.forward_head(features, pre_logits=True)
    return pooled, teacher.forward_head(features)


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
    """

    def __init__(self, teacher: Optional[nn.Module], base_criterion: nn.Module, alpha: float = 1.0,
                 gamma: float = 1.0, temperature: float = 1.0, normalisation: str = "layernorm",
                 feature_loss: str = "smooth_l1"):
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

    @property
    def needs_student_features(self) -> bool:
        return self.alpha > 0

    def train(self, mode: bool = True):
        # The teacher stays in eval mode whatever the criterion's mode (BN statistics frozen).
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

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
                teacher_features, teacher_logits = teacher_outputs(self.teacher, samples)
            if self.gamma > 0:
                terms["kd"] = self.gamma * logit_distillation_loss(dist_logits, teacher_logits, self.temperature)
            if self.alpha > 0:
                if len(outputs) < 3:
                    raise ValueError("alpha > 0 needs the student's projected features: call it with with_projection=True")
                terms["vkd"] = self.alpha * feature_distillation_loss(
                    outputs[2], teacher_features, self.normalisation, self.feature_loss)
        terms["loss"] = terms["ce"] + terms["kd"] + terms["vkd"]
        return terms
