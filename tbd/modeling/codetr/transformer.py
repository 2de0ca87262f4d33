"""Deformable-DETR encoder and decoder (the decoder with iterative box refinement).

Coordinates: boxes and reference points are ``(cx, cy, w, h)`` / ``(x, y)`` normalised by each
image's own (unpadded) size; the valid ratios (unpadded / padded extent per level) map them onto
the padded feature maps where the attention samples.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbd.modeling.codetr.deform_attn import MSDeformAttn

_EPS = 1e-5


def inverse_sigmoid(x: Tensor, eps: float = _EPS) -> Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def map_position_embedding(mask: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of the normalised (x, y) of every unpadded cell: ``mask [B, H, W]`` (True =
    padding) -> ``[B, 2 * num_feats, H, W]`` (y features first, then x)."""
    valid = (~mask).to(torch.float32)
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], dim=4).flatten(3)
    pos_y = torch.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], dim=4).flatten(3)
    return torch.cat([pos_y, pos_x], dim=3).permute(0, 3, 1, 2)


def box_position_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised ``(cx, cy, w, h)`` boxes ``[..., 4]`` -> ``[..., 4 * num_feats]``
    (PE(B) of the notes; the two-stage queries and Co-DETR's positive queries use it)."""
    dim_t = torch.arange(num_feats, dtype=boxes.dtype, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = boxes[..., None] * (2 * math.pi) / dim_t  # [..., 4, F]
    pos = torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=-1).flatten(-2)
    return pos.flatten(-2)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class FFN(nn.Module):
    def __init__(self, d_model: int, dim_ff: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class EncoderLayer(nn.Module):
    def __init__(
        self, d_model: int, dim_ff: int, dropout: float, n_levels: int, n_heads: int, n_points: int
    ) -> None:
        super().__init__()
        self.attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, dim_ff, dropout)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: Tensor, padding: Tensor
    ) -> Tensor:
        attended = self.attn(src + pos, reference_points, src, shapes, padding)
        return self.ffn(self.norm(src + self.dropout(attended)))


class DecoderLayer(nn.Module):
    def __init__(
        self, d_model: int, dim_ff: int, dropout: float, n_levels: int, n_heads: int, n_points: int
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, dim_ff, dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_boxes: Tensor,
        memory: Tensor,
        shapes: Tensor,
        memory_padding: Tensor,
        query_padding: Tensor | None,
    ) -> Tensor:
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, key_padding_mask=query_padding, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(attended))
        attended = self.cross_attn(tgt + query_pos, reference_boxes, memory, shapes, memory_padding)
        return self.ffn(self.norm2(tgt + self.dropout(attended)))


def encoder_reference_points(shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Cell centres of every level, normalised by the valid extent, seen on every level:
    ``[B, S, L, 2]``."""
    refs = []
    for lvl, (h, w) in enumerate(shapes.tolist()):
        ys = torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device)
        xs = torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device)
        ry, rx = torch.meshgrid(ys, xs, indexing="ij")
        ry = ry.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * h)
        rx = rx.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack([rx, ry], -1))
    ref = torch.cat(refs, 1)
    return ref[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(
        self, src: Tensor, pos: Tensor, shapes: Tensor, valid_ratios: Tensor, padding: Tensor
    ) -> Tensor:
        ref = encoder_reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, ref, shapes, padding)
        return src


class DeformableDecoder(nn.Module):
    """Decoder layers whose box references are refined layer by layer (Deformable DETR's
    iterative refinement): layer l predicts ``sigmoid(bbox_embed[l](h_l) + logit(ref_l))``,
    which (detached) is layer l+1's reference. Without refinement the reference stays fixed."""

    def __init__(self, layer: DecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference: Tensor,
        memory: Tensor,
        shapes: Tensor,
        valid_ratios: Tensor,
        memory_padding: Tensor,
        bbox_embed: Sequence[nn.Module],
        refine: bool,
        query_padding: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Returns the per-layer hidden states ``[B, Q, C]`` and predicted boxes ``[B, Q, 4]``."""
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        ref = reference  # detached by the caller where it must be (two-stage); later layers' always are
        states, boxes = [], []
        out = tgt
        for lvl, layer in enumerate(self.layers):
            out = layer(
                out, query_pos, ref[:, :, None] * ratios, memory, shapes, memory_padding, query_padding
            )
            box = (bbox_embed[lvl](out) + inverse_sigmoid(ref)).sigmoid()
            states.append(out)
            boxes.append(box)
            if refine:
                ref = box.detach()
        return states, boxes
