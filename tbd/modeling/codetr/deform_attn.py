"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch.

For a query q with reference point r_q (normalised ``[0, 1]`` coordinates) the output of head m is

    sum_l sum_p A[q, m, l, p] * V_l[m](s[q, m, l, p]),

where ``V_l[m]`` is head m's slice of the value map of level l, ``s`` the sampling locations
(the reference point plus learnt offsets) and ``A`` attention weights normalised (softmax) over the
``L * P`` samples of each head. ``V_l[m](s)`` is bilinear interpolation with zeros outside the
map, the pixel-centre convention of ``grid_sample(align_corners=False)``: location ``x`` in
``[0, 1]`` falls on column ``x * W - 0.5``. No compiled extension is needed; the cost is one
``grid_sample`` per level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_attn(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """The attention above for a batch.

    Args:
        value: ``[B, S, M, D]``: the levels' maps flattened row-major and concatenated
            (``S = sum_l H_l W_l``), split into M heads of D channels.
        spatial_shapes: ``[L, 2]`` long, ``(H_l, W_l)`` per level.
        sampling_locations: ``[B, Q, M, L, P, 2]`` ``(x, y)`` in ``[0, 1]`` of each level's map.
        attention_weights: ``[B, Q, M, L, P]``.

    Returns:
        ``[B, Q, M * D]``.
    """
    b, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    per_level = value.split(sizes, dim=1)
    grids = 2.0 * sampling_locations - 1.0  # grid_sample's [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(b * m, d, int(h), int(w))
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * m, q, n_points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*M, D, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, n_levels * n_points)
    out = (stacked * weights).sum(-1)  # [B*M, D, Q]
    return out.view(b, m * d, q).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """The learnt part: value/output projections, sampling offsets and attention weights.

    Reference points are either points ``[B, Q, L, 2]`` (encoder: offsets are in units of the
    level's cells) or boxes ``[B, Q, L, 4]`` ``(cx, cy, w, h)`` (decoder with box references:
    offsets are fractions of half the box, spread over the P points).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"hidden size {d_model} is not divisible by the {n_heads} attention heads")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # offsets start on a ring of directions, one per head, growing with the point index
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        ring = torch.stack([angles.cos(), angles.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True)[0]
        ring = ring.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        ring = ring * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """``query [B, Q, C]``, ``value [B, S, C]``, ``value_padding_mask [B, S]`` (True = padding)."""
        b, q, _ = query.shape
        m, n_l, n_p = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(b, v.shape[1], m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, q, m, n_l, n_p, 2)
        weights = self.attention_weights(query).view(b, q, m, n_l * n_p).softmax(-1).view(b, q, m, n_l, n_p)
        if reference_points.shape[-1] == 2:
            normaliser = spatial_shapes.flip(-1).to(offsets.dtype)  # (W, H) per level
            locations = (
                reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None]
            )
        elif reference_points.shape[-1] == 4:
            ref = reference_points[:, :, None, :, None]
            locations = ref[..., :2] + offsets / n_p * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference points end in 2 (points) or 4 (boxes), got {reference_points.shape}")
        return self.output_proj(ms_deform_attn(v, spatial_shapes, locations, weights))
