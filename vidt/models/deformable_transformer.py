"""ViDT's neck: a decoder-only deformable transformer over the body's 4 levels."""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidt.models.ms_deform_attn import MSDeformAttn
from vidt.util.box_ops import inverse_sigmoid


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: self-attention, deformable cross-attention into the memory, FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, padding_mask):
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableDecoder(nn.Module):
    """Stack of decoder layers returning every level, the input included.

    With iterative box refinement the detector assigns its 7 box heads to ``bbox_embed``: the
    reference starts as the level-0 box prediction and each layer's output refines it (detached).
    Otherwise the 2-D reference points stay fixed.
    """

    def __init__(self, layers: List[DeformableDecoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.bbox_embed = None

    def forward(self, tgt, reference_points, memory, spatial_shapes, valid_ratios, query_pos, padding_mask):
        """Returns hs [num_layers+1,B,Q,C] and the reference fed to each layer plus the last one."""
        if self.bbox_embed is not None:
            box = self.bbox_embed[0](tgt)
            box = torch.cat([box[..., :2] + inverse_sigmoid(reference_points), box[..., 2:]], dim=-1)
            reference = box.sigmoid().detach()
        else:
            reference = reference_points
        outputs, references = [tgt], []
        output = tgt
        for index, layer in enumerate(self.layers):
            ratios = torch.cat([valid_ratios, valid_ratios], -1) if reference.shape[-1] == 4 else valid_ratios
            references.append(reference)
            output = layer(output, query_pos, reference[:, :, None] * ratios[:, None],
                           memory, spatial_shapes, padding_mask)
            if self.bbox_embed is not None:
                reference = (self.bbox_embed[index + 1](output) + inverse_sigmoid(reference)).sigmoid().detach()
            outputs.append(output)
        references.append(reference)
        return torch.stack(outputs), torch.stack(references)


def valid_ratios_of(mask: torch.Tensor) -> torch.Tensor:
    """(valid width / W, valid height / H) of a [B,H,W] padding mask, from its first row and column."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / W, valid_h.float() / H], -1)


class DeformableTransformer(nn.Module):
    """Decoder-only deformable transformer. No encoder, and no level or positional embedding is added
    to the memory: ``level_embed`` exists only because released checkpoints contain it."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_decoder_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.1, num_feature_levels: int = 4, dec_n_points: int = 4):
        super().__init__()
        self.d_model = d_model
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.decoder = DeformableDecoder([
            DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points)
            for _ in range(num_decoder_layers)])
        self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: List[torch.Tensor], masks: List[torch.Tensor], tgt: torch.Tensor, query_pos: torch.Tensor):
        """srcs [B,C,H_l,W_l], masks [B,H_l,W_l], tgt and query_pos [B,Q,C] ->
        (hs [layers+1,B,Q,C], initial reference points [B,Q,2], per-layer references)."""
        memory = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], dim=1)
        padding_mask = torch.cat([mask.flatten(1) for mask in masks], dim=1)
        spatial_shapes = torch.as_tensor([src.shape[-2:] for src in srcs], dtype=torch.long, device=memory.device)
        valid_ratios = torch.stack([valid_ratios_of(mask) for mask in masks], dim=1)
        reference_points = self.reference_points(query_pos).sigmoid()
        hs, references = self.decoder(tgt, reference_points, memory, spatial_shapes, valid_ratios,
                                      query_pos, padding_mask)
        return hs, reference_points, references
