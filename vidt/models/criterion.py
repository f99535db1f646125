"""Set criterion of ViDT with the VkD distillation term.

DETR's shape: forward returns a dict of unweighted losses and ``weight_dict`` says how to sum them.
Like DeiT's DistillationLoss the criterion owns the frozen teacher, so the training loop is the same
with and without distillation: ``criterion(outputs, targets, samples)``; the teacher runs on
``samples`` (the same padded batch) only when samples are given, i.e. during training.
"""
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidt.util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from vidt.util.nested_tensor import NestedTensor
from vkd.distributed import mean_over_ranks
from vkd.frozen import TeacherOwner, freeze
from vkd.losses import feature_distillation_loss

FOCAL_GAMMA = 2.0


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float,
                       gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) summed over all elements / num_boxes; logits, targets [B,Q,K]."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


@torch.no_grad()
def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.numel() == 0:
        return logits.new_zeros(())
    return (logits.argmax(-1) == labels).float().mean() * 100


def distillation_loss(student_tokens: Dict, teacher_tokens: Dict) -> torch.Tensor:
    """VkD detection term: sum over the 6 token groups of the core's feature term (smooth-L1) between
    batch-standardised sides.

    Standardisation is per feature over all rows (padded pixels and all decoder levels included),
    unbiased std and no epsilon, as in the original.
    """
    student = student_tokens["patch_token"] + [student_tokens["body_det_token"], student_tokens["neck_det_token"]]
    teacher = teacher_tokens["patch_token"] + [teacher_tokens["body_det_token"], teacher_tokens["neck_det_token"]]
    return sum(feature_distillation_loss(s, t, "batchstd", normalise_student=True) for s, t in zip(student, teacher))


class SetCriterion(TeacherOwner):
    """Focal class loss, L1 and GIoU box losses on matched pairs, for the final and every aux output.

    Parameters:
        matcher: HungarianMatcher.
        weight_dict: loss name -> weight (only names present in the loss dict are summed).
        focal_alpha: alpha of the focal class loss.
        teacher: optional detector with ``distil=True``; frozen here and kept in eval mode.
    """

    def __init__(self, matcher: nn.Module, weight_dict: Dict[str, float], focal_alpha: float,
                 teacher: Optional[nn.Module] = None):
        super().__init__()
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.teacher = teacher if teacher is None else freeze(teacher)

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True) -> Dict[str, torch.Tensor]:
        logits = outputs["pred_logits"]
        batch_idx, query_idx = _matched_positions(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        # Unmatched queries get an all-zero target: there is no "no object" logit with focal loss.
        one_hot = torch.zeros_like(logits)
        one_hot[batch_idx, query_idx, matched_labels] = 1.0
        losses = {"loss_ce": sigmoid_focal_loss(logits, one_hot, num_boxes, self.focal_alpha)}
        if log:
            losses["class_error"] = 100 - top1_accuracy(logits[batch_idx, query_idx], matched_labels)
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        """Logged only: |#queries whose best class is not the last one - #targets|, as in Deformable DETR."""
        logits = outputs["pred_logits"]
        target_counts = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted_counts = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted_counts.float(), target_counts.float())}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        batch_idx, query_idx = _matched_positions(indices)
        pred = outputs["pred_boxes"][batch_idx, query_idx]
        target = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)))
        return {"loss_bbox": F.l1_loss(pred, target, reduction="none").sum() / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def _set_losses(self, outputs, targets, num_boxes, log: bool) -> Dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return losses

    def forward(self, outputs: Dict, targets: List[Dict], samples: Optional[NestedTensor] = None):
        num_boxes = _global_num_boxes(targets, outputs["pred_logits"].device)
        losses = self._set_losses(outputs, targets, num_boxes, log=True)
        for level, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._set_losses(aux, targets, num_boxes, log=False)
            losses.update({f"{name}_{level}": value for name, value in aux_losses.items()})
        if self.teacher is not None and samples is not None:
            if "distil_tokens" not in outputs:
                raise RuntimeError("distillation needs a student built with distil=True (its distil_tokens)")
            with torch.no_grad():
                teacher_tokens = self.teacher(samples)["distil_tokens"]
            losses["loss_distil"] = distillation_loss(outputs["distil_tokens"], teacher_tokens)
        return losses


def _matched_positions(indices):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


def _global_num_boxes(targets, device) -> float:
    """Average number of target boxes per process, at least 1 (normalises every box and class loss)."""
    num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    return torch.clamp(mean_over_ranks(num_boxes), min=1).item()
