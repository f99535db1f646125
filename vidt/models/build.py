"""build(args) -> (model, criterion, postprocessors), and the VkD teacher."""
from typing import Dict

import torch.nn as nn

from vidt.models.criterion import SetCriterion
from vidt.models.deformable_transformer import DeformableTransformer
from vidt.models.detector import PROJECTOR_NAMES, Detector, PostProcess, is_projector_key
from vidt.models.matcher import HungarianMatcher
from vidt.models.swin_ram import build_swin_ram
from vidt.util.checkpoint import load_checkpoint, model_state_from
from vkd.checkpoints import strict_load
from vkd.errors import BadInput
from vkd.frozen import freeze

NUM_CLASSES = {"coco": 91}  # COCO category ids run to 90; labels are the raw ids
TEACHER_BACKBONES = {"vidt_nano": "swin_nano", "vidt_tiny": "swin_tiny", "vidt_small": "swin_small",
                     "vidt_base": "swin_base_win7_22k"}


def build_detector(args, backbone_name: str, pre_trained: str, distil: bool, with_projectors: bool) -> Detector:
    backbone = build_swin_ram(backbone_name, pre_trained, det_token_num=args.det_token_num,
                              pos_dim=args.reduced_dim, cross_indices=args.cross_indices)
    transformer = DeformableTransformer(d_model=args.reduced_dim, nhead=args.nheads, num_decoder_layers=args.dec_layers,
                                        dim_feedforward=args.dim_feedforward, dropout=args.dropout,
                                        num_feature_levels=args.num_feature_levels, dec_n_points=args.dec_n_points)
    return Detector(backbone, transformer, num_classes=NUM_CLASSES[args.dataset_file], aux_loss=args.aux_loss,
                    with_box_refine=args.with_box_refine, distil=distil, with_projectors=with_projectors)


def build_teacher(args) -> Detector:
    """The teacher uses the student's flags with the --distil_model body, loaded strictly and frozen."""
    if args.distil_model not in TEACHER_BACKBONES:
        raise BadInput(f"--distil_model must be one of {sorted(TEACHER_BACKBONES)}, got {args.distil_model}")
    if not args.distil_model_path:
        raise BadInput("--distil_model needs --distil_model_path (the teacher checkpoint)")
    teacher = build_detector(args, TEACHER_BACKBONES[args.distil_model], "none", distil=True, with_projectors=False)
    source = f"teacher checkpoint {args.distil_model_path}"
    state = model_state_from(load_checkpoint(args.distil_model_path, "--distil_model_path"), args.distil_model_path)
    projector_keys = [k for k in state if is_projector_key(k)]
    if projector_keys:
        # A student trained here: the projectors map student tokens, so a teacher has no use for them.
        state = {k: v for k, v in state.items() if not is_projector_key(k)}
        print(f"| {source}: its {len(projector_keys)} projector keys (a VkD student) are not used by a teacher")
    strict_load(teacher, state, source)
    print(f"number of params for teacher: {sum(p.numel() for p in teacher.parameters())}")
    return freeze(teacher)


def load_student_weights(model: Detector, state: Dict, source: str) -> bool:
    """Strict load into a student. A file without any projector key (NAVER's plain ViDT, e.g.
    vidt_nano_50.pth) loads everything else strictly and the six projectors start fresh; any other
    mismatch stops with the key names. Returns True when the projectors started fresh."""
    if model.with_projectors and not any(is_projector_key(k) for k in state):
        fresh = strict_load(model, state, source, may_start_fresh=is_projector_key)
        print(f"| {source} has no projector keys (a plain ViDT file): {len(fresh)} keys of "
              f"{', '.join(PROJECTOR_NAMES)} start fresh")
        return True
    strict_load(model, state, source)
    return False


def build_weight_dict(args) -> Dict[str, float]:
    weight_dict = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.aux_loss:
        weight_dict.update({f"{name}_{level}": weight for level in range(args.dec_layers)
                            for name, weight in list(weight_dict.items())})
    if args.distil_model is not None:
        weight_dict["loss_distil"] = args.distil_loss_coef
    return weight_dict


def build(args):
    """The student always carries the six projectors (checkpoints hold them); it returns distil
    tokens, and the criterion owns a teacher, only when --distil_model is given."""
    distil = args.distil_model is not None
    model = build_detector(args, args.backbone_name, args.pre_trained, distil=distil, with_projectors=True)
    matcher = HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                               cost_giou=args.set_cost_giou)
    teacher = build_teacher(args) if distil else None
    criterion = SetCriterion(matcher, build_weight_dict(args),
                             focal_alpha=args.focal_alpha, teacher=teacher)
    postprocessors: Dict[str, nn.Module] = {"bbox": PostProcess()}
    return model, criterion, postprocessors
