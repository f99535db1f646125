"""VkD (Miles, Elezi, Deng, CVPR 2024): cross-entropy, logit KD on the distillation head, and the feature term
between the orthogonally projected student feature and the normalised teacher feature."""
from typing import Dict

import torch

from distillers.base import INFINITY, Distiller, Flag, StudentOutputs
from models import DEFAULT_PROJECTOR_IMPL, PROJECTORS
from vkd import orthogonal_maps
from vkd.losses import FEATURE_LOSSES, feature_distillation_loss, get_feature_loss, logit_distillation_loss
from vkd.norms import NORMALISATIONS, get_normalisation

ALPHA = Flag("--alpha", default=1.0, range=(0.0, INFINITY, True, False),
             help="weight of the feature term (default: 1)")
# The logit term's flags, shared with the kd distiller.
GAMMA = Flag("--gamma", default=1.0, range=(0.0, INFINITY, True, False),
             help="weight of the logit (KL) term (default: 1)")
TEMPERATURE = Flag("--temperature", default=1.0, range=(0.0, INFINITY, False, False),
                   help="KL temperature of the logit term (default: 1)")
NORMALISATION = Flag("--normalisation", type=str, default="layernorm", choices=tuple(NORMALISATIONS),
                     help="teacher feature normalisation (default: layernorm)")
FEATURE_LOSS = Flag("--feature-loss", type=str, default="smooth_l1", choices=tuple(FEATURE_LOSSES),
                    help="feature distance (default: smooth_l1)")
PROJECTOR = Flag("--projector", type=str, default="orthogonal", choices=PROJECTORS,
                 help="student -> teacher feature map: VkD's orthogonal one, or a plain linear layer (ablation)")
ORTHOGONAL_MAP = Flag("--orthogonal-map", type=str, default=None, choices=orthogonal_maps.ORTHOGONAL_MAPS,
                      help="orthogonal map (default: torch's choice, householder for non-square)")
PROJECTOR_IMPL = Flag("--projector-impl", type=str, default=DEFAULT_PROJECTOR_IMPL,
                      choices=orthogonal_maps.IMPLEMENTATIONS, defines_run=False,
                      help=f"implementation of the orthogonal projector (default: {DEFAULT_PROJECTOR_IMPL})")
PROJECTOR_WEIGHT_DECAY = Flag(
    "--projector-weight-decay", default=False, switch="--no-projector-weight-decay",
    help="weight decay on the projector's parametrization, as the original code: with the Householder map it "
         "zeroes the projector after the first AdamW step (docs/differences.md)",
    switch_help="no weight decay on the projector, which then stays an isometry, as the paper describes the "
                "method (default)")
FEATURE_FLAGS = ("normalisation", "feature_loss", "projector", "orthogonal_map", "projector_impl",
                 "projector_weight_decay")


class VkD(Distiller):
    name = "vkd"
    summary = ("CE + gamma x KL(T) on the distillation head + alpha x smooth-L1(orthogonal projection of the "
               "student feature, LayerNorm of the teacher feature)")
    source = "VkD, Miles, Elezi, Deng, CVPR 2024"
    loss_terms = ("ce", "kd", "vkd")
    flags = (ALPHA, GAMMA, TEMPERATURE, PROJECTOR, NORMALISATION, FEATURE_LOSS, ORTHOGONAL_MAP, PROJECTOR_IMPL,
             PROJECTOR_WEIGHT_DECAY)

    def __init__(self, args, teacher, base_criterion, **kwargs):
        get_normalisation(args.normalisation)  # unknown names fail here, not at the first step
        get_feature_loss(args.feature_loss)
        super().__init__(args, teacher, base_criterion, **kwargs)
        self.alpha, self.gamma, self.temperature = args.alpha, args.gamma, args.temperature
        self.normalisation, self.feature_loss = args.normalisation, args.feature_loss

    @classmethod
    def needs_teacher(cls, args) -> bool:
        return args.alpha > 0 or args.gamma > 0

    @classmethod
    def needs_teacher_logits(cls, args) -> bool:
        return args.gamma > 0

    @classmethod
    def projector(cls, args):
        return args.projector if args.alpha > 0 else None

    @classmethod
    def trains_distillation_head(cls, args) -> bool:
        return args.gamma > 0

    @classmethod
    def decays_projector(cls, args) -> bool:
        return args.projector_weight_decay

    @classmethod
    def inert_flags(cls, args):
        found = []
        if args.alpha == 0:
            found.append((FEATURE_FLAGS, "--alpha 0 turns feature distillation off"))
        if args.gamma == 0:
            found.append((("temperature",), "--gamma 0 turns logit distillation off"))
        return found

    def terms(self, samples: torch.Tensor, outputs: StudentOutputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        zero = outputs.logits.new_zeros(()).float()
        terms = {"ce": self.base_criterion(outputs.logits, targets), "kd": zero, "vkd": zero}
        if self.alpha > 0 or self.gamma > 0:
            teacher_features, teacher_logits = self.teacher_outputs(samples)
            if self.gamma > 0:
                terms["kd"] = self.gamma * logit_distillation_loss(outputs.dist_logits, teacher_logits, self.temperature)
            if self.alpha > 0:
                if outputs.features is None:
                    raise ValueError("alpha > 0 needs the student's projected features (StudentOutputs.features)")
                terms["vkd"] = self.alpha * feature_distillation_loss(
                    outputs.features, teacher_features, self.normalisation, self.feature_loss)
        return terms
