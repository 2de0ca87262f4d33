"""DW box refinement: re-read each side of a coarse box at a boundary point, by bilinear sampling.

From the coarse side distances ``(l, t, r, b)`` of a location ``(x, y)``, one boundary point per
side is placed near that side (left: ``(x - l, y)``, top: ``(x, y - t)``, right: ``(x + r, y)``,
bottom: ``(x, y + b)``) and moved by a learned offset ``(dx, dy)`` (in feature cells). The
decoded coarse box map is sampled there, one coordinate per side (the left point reads ``x1``, the
top point ``y1``, ...), and the refined distance is re-measured from ``(x, y)``. Points near an
object's boundary see that boundary better, so the re-read side is usually more accurate. Plain
``grid_sample``, no compiled deformable-conv op.

Offsets layout: ``[N, 8, H, W]`` = ``(dx, dy)`` for left, top, right, bottom, in cells of the level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def refine_ltrb(ltrb: Tensor, offsets: Tensor, points: Tensor, stride: float) -> Tensor:
    """Refined side distances ``[N, 4, H, W]`` (pixels, non-negative).

    ``ltrb [N, 4, H, W]`` coarse distances in pixels, ``offsets [N, 8, H, W]`` (see module doc),
    ``points [H*W, 2]`` the centres of the level's locations (``grid_points`` of the same map).
    Sampling outside the map reads its border (``padding_mode="border"``).
    """
    n, _, h, w = ltrb.shape
    px = points[:, 0].reshape(1, h, w).to(ltrb.dtype)
    py = points[:, 1].reshape(1, h, w).to(ltrb.dtype)
    left, top, right, bottom = ltrb.unbind(dim=1)
    boxes = torch.stack([px - left, py - top, px + right, py + bottom], dim=1)  # [N, 4, H, W]

    d = ltrb / stride
    off = offsets.reshape(n, 4, 2, h, w)
    zero = torch.zeros_like(left)
    # displacement of each side's boundary point from the location, in cells
    dx = torch.stack([-d[:, 0], zero, d[:, 2], zero], dim=1) + off[:, :, 0]
    dy = torch.stack([zero, -d[:, 1], zero, d[:, 3]], dim=1) + off[:, :, 1]
    cols = torch.arange(w, device=ltrb.device, dtype=ltrb.dtype).view(1, 1, 1, w)
    rows = torch.arange(h, device=ltrb.device, dtype=ltrb.dtype).view(1, 1, h, 1)
    # cell index -> normalised coordinate of its centre (align_corners=False convention)
    gx = (2.0 * (cols + dx) + 1.0) / w - 1.0
    gy = (2.0 * (rows + dy) + 1.0) / h - 1.0
    grid = torch.stack([gx, gy], dim=-1).reshape(n * 4, h, w, 2)
    sampled = F.grid_sample(
        boxes.reshape(n * 4, 1, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).reshape(n, 4, h, w)
    x1, y1, x2, y2 = sampled.unbind(dim=1)
    return F.relu(torch.stack([px - x1, py - y1, x2 - px, y2 - py], dim=1))


class BoxRefinement(nn.Module):
    """The light offset predictor (one 3x3 conv on the regression feature) plus the re-reading."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.offset = nn.Conv2d(in_channels, 8, kernel_size=3, padding=1)
        nn.init.normal_(self.offset.weight, std=0.01)
        nn.init.zeros_(self.offset.bias)

    def forward(self, reg_feature: Tensor, ltrb: Tensor, points: Tensor, stride: float) -> Tensor:
        return refine_ltrb(ltrb, self.offset(reg_feature), points, stride)
