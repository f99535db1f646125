"""Hungarian matching of queries to ground-truth boxes."""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from vidt.util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# The original matcher hard-codes the focal parameters, whatever --focal_alpha says.
MATCHER_FOCAL_ALPHA = 0.25
MATCHER_FOCAL_GAMMA = 2.0
LOG_EPS = 1e-8


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_bbox*L1 + cost_class*focal + cost_giou*(-GIoU), per image.

    Parameters:
        cost_class, cost_bbox, cost_giou: weights of the three cost terms (--set_cost_*).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("the matcher needs at least one non-zero cost weight")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict, targets: List[Dict]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Returns, per image, (query indices, target indices) of equal length min(Q, #targets)."""
        batch_size, num_queries = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(batch_size)]
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
        pred_boxes = outputs["pred_boxes"].flatten(0, 1)
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])

        alpha, gamma = MATCHER_FOCAL_ALPHA, MATCHER_FOCAL_GAMMA
        negative = (1 - alpha) * prob ** gamma * -(1 - prob + LOG_EPS).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + LOG_EPS).log()
        cost_class = positive[:, target_labels] - negative[:, target_labels]
        cost_bbox = torch.cdist(pred_boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(batch_size, num_queries, -1).cpu()

        indices = []
        for image, image_cost in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(image_cost[image])
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
