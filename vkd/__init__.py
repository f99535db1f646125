"""VkD: knowledge distillation with orthogonal projections (Miles, Elezi, Deng, CVPR 2024).

The method, for use in any training loop (shapes: B the batch, D_s / D_t the student / teacher widths)::

    projector = OrthogonalProjector(D_s, D_t)          # bias-free; orthonormal columns (rows if D_s > D_t)
    t_features, t_logits = features_and_logits(teacher, images)   # [B, D_t], [B, classes]
    s_features, s_logits = features_and_logits(student, images)   # [B, D_s], [B, classes]
    loss = (cross_entropy(s_logits, labels)
            + feature_distillation_loss(projector(s_features), t_features, "layernorm")
            + logit_distillation_loss(s_logits, t_logits, temperature=1.0))

Give the projector no weight decay: it is what keeps torch's Householder map an isometry.
Importing ``vkd`` loads torch only; the repository's command lines, data sets and logging are elsewhere.
"""
from vkd.frozen import freeze
from vkd.losses import (
    FEATURE_LOSSES,
    feature_distillation_loss,
    feature_width,
    features_and_logits,
    logit_distillation_loss,
)
from vkd.norms import NORMALISATIONS, batch_standardise, build_normalisation, layernorm, whiten, whiten_cholesky
from vkd.projector import OrthogonalLinear, OrthogonalProjector

__all__ = [
    "OrthogonalProjector", "OrthogonalLinear", "freeze",
    "features_and_logits", "feature_width", "feature_distillation_loss", "logit_distillation_loss", "FEATURE_LOSSES",
    "layernorm", "batch_standardise", "whiten", "whiten_cholesky", "build_normalisation", "NORMALISATIONS",
]
