"""ViDT detector: Swin-with-RAM body, deformable neck, per-level heads.

With ``with_projectors`` the six VkD projectors of roymiles/VkD are registered last, under the
original attribute names, so the state dict equals the released layout; with ``distil`` the forward
pass also returns the tokens that the distillation loss compares.
"""
import copy
import math
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidt.models.deformable_transformer import DeformableTransformer
from vidt.models.swin_ram import SwinRAM
from vidt.util.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from vidt.util.nested_tensor import NestedTensor, resize_mask
from vkd.projector import OrthogonalLinear

PATCH_PROJECTORS = ("patch_projector_1", "patch_projector_2", "patch_projector_3", "patch_projector_4")
PROJECTOR_NAMES = PATCH_PROJECTORS + ("neck_det_projector", "body_det_projector")


def is_projector_key(key: str) -> bool:
    return key.split(".", 1)[0] in PROJECTOR_NAMES


CLASS_PRIOR = 0.01  # focal-loss init: every class starts at probability 0.01
MAX_DETECTIONS = 100


class MLP(nn.Module):
    """Linear layers with ReLU in between (the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


def conv1x1_group_norm(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1), nn.GroupNorm(32, out_channels))


class Detector(nn.Module):
    """ViDT with a neck.

    Parameters:
        backbone: SwinRAM body. transformer: DeformableTransformer neck.
        num_classes: class logits per query (91 for COCO: labels are raw category ids).
        aux_loss: also return the predictions of the first num_layers levels.
        with_box_refine: independent heads per level and iterative box refinement in the decoder.
        distil: return ``distil_tokens`` (projected when with_projectors) for the VkD loss.
        with_projectors: register the six orthogonal projectors (students; checkpoints hold them).
    """

    def __init__(self, backbone: SwinRAM, transformer: DeformableTransformer, num_classes: int, aux_loss: bool,
                 with_box_refine: bool, distil: bool, with_projectors: bool):
        super().__init__()
        hidden_dim = transformer.d_model
        num_pred = transformer.decoder.num_layers + 1
        self.aux_loss, self.distil, self.with_projectors = aux_loss, distil, with_projectors
        self.transformer = transformer

        class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - CLASS_PRIOR) / CLASS_PRIOR))
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            # Only the first level starts with small boxes (sigmoid(-2) ~ 0.12), as in the original.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)

        self.backbone = backbone
        self.input_proj = nn.ModuleList(conv1x1_group_norm(c, hidden_dim) for c in backbone.num_channels)
        self.tgt_proj = conv1x1_group_norm(backbone.det_tgt_channels, hidden_dim)
        self.query_pos_proj = conv1x1_group_norm(hidden_dim, hidden_dim)
        for proj in [*self.input_proj, self.tgt_proj, self.query_pos_proj]:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        if with_projectors:
            for name in PROJECTOR_NAMES:
                setattr(self, name, OrthogonalLinear(hidden_dim, hidden_dim))

    def forward(self, samples: NestedTensor) -> Dict:
        features, det_tgt, det_pos = self.backbone(samples.tensors, samples.mask)
        masks = [resize_mask(samples.mask, f.shape[-2:]) for f in features]
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        # Det tokens as a [B,C,N,1] "image", so GroupNorm pools each channel group over the N tokens.
        tgt = self.tgt_proj(det_tgt.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        query_pos = self.query_pos_proj(det_pos.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        query_pos = query_pos.expand(tgt.shape[0], -1, -1)
        hs, init_reference, references = self.transformer(srcs, masks, tgt, query_pos)

        logits, boxes = self._predict_levels(hs, init_reference, references)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        if self.distil:
            out["distil_tokens"] = self._distil_tokens(srcs, tgt, hs)
        return out

    def _predict_levels(self, hs: torch.Tensor, init_reference: torch.Tensor, references: torch.Tensor):
        logits, boxes = [], []
        for level in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if level == 0 else references[level - 1])
            box = self.bbox_embed[level](hs[level])
            if reference.shape[-1] == 4:
                box = box + reference
            else:
                box = torch.cat([box[..., :2] + reference, box[..., 2:]], dim=-1)
            logits.append(self.class_embed[level](hs[level]))
            boxes.append(box.sigmoid())
        return logits, boxes

    def _distil_tokens(self, srcs: List[torch.Tensor], tgt: torch.Tensor, hs: torch.Tensor) -> Dict:
        """Rows to distil, as in roymiles/VkD: 4 projected patch levels in (b,y,x) order, the body's
        det tokens after tgt_proj, and all decoder levels' det tokens."""
        patch = [src.permute(0, 2, 3, 1).flatten(0, 2) for src in srcs]
        body = tgt.flatten(0, 1)
        neck = hs.flatten(0, 2)
        if self.with_projectors:
            patch = [getattr(self, name)(p) for name, p in zip(PATCH_PROJECTORS, patch)]
            body = self.body_det_projector(body)
            neck = self.neck_det_projector(neck)
        return {"patch_token": patch, "body_det_token": body, "neck_det_token": neck}


class PostProcess(nn.Module):
    """Top-100 (query, class) pairs over all queries, no NMS; boxes in absolute xyxy of the original image."""

    @torch.no_grad()
    def forward(self, outputs: Dict, target_sizes: torch.Tensor) -> List[Dict]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        num_classes = logits.shape[-1]
        prob = logits.sigmoid().flatten(1)
        scores, flat_index = prob.topk(min(MAX_DETECTIONS, prob.shape[1]), dim=1)
        query = torch.div(flat_index, num_classes, rounding_mode="floor")
        labels = flat_index % num_classes
        boxes = box_cxcywh_to_xyxy(boxes).gather(1, query[..., None].expand(-1, -1, 4))
        img_h, img_w = target_sizes.unbind(1)
        boxes = boxes * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]
