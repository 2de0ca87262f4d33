"""The FCOS-style dense head of the DW detector (shared over FPN levels)."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from torch import Tensor, nn

from tbd.modeling.dw.refine import BoxRefinement
from tbd.ops.boxes import grid_points


def _tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=True)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        layers.append(conv)
        if norm:
            layers.append(get_norm(norm, channels))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DWHead(nn.Module):
    """Class, box and centerness branches; optional box refinement.

    ``forward(features)`` returns three per-level lists: class logits ``[N, C, H, W]``, side
    distances ``ltrb`` in pixels ``[N, 4, H, W]`` (after refinement when enabled) and
    centerness/objectness logits ``[N, 1, H, W]``. The coarse distances (before refinement) are
    the second input of ``self.refine`` (a forward hook there reads them).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        strides: Sequence[int],
        num_convs: int = 4,
        norm: str = "GN",
        prior_prob: float = 0.02,
        reg_bias_init: float = 4.0,
        box_refinement: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.strides = [int(s) for s in strides]
        self.cls_subnet = _tower(in_channels, num_convs, norm)
        self.bbox_subnet = _tower(in_channels, num_convs, norm)
        self.cls_score = nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, kernel_size=3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, kernel_size=3, padding=1)
        for conv in (self.cls_score, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(self.bbox_pred.bias, reg_bias_init)
        nn.init.zeros_(self.centerness.bias)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        self.refine = BoxRefinement(in_channels) if box_refinement else None

    @property
    def box_refinement(self) -> bool:
        return self.refine is not None

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        assert len(features) == len(self.strides), "one feature map per stride"
        logits, ltrbs, ctrs = [], [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            logits.append(self.cls_score(self.cls_subnet(feature)))
            reg_feature = self.bbox_subnet(feature)
            ctrs.append(self.centerness(reg_feature))
            ltrb = F.relu(self.bbox_pred(reg_feature) * self.scales[level]) * stride
            if self.refine is not None:
                h, w = feature.shape[-2:]
                (points,) = grid_points([(h, w)], [stride], device=feature.device, dtype=ltrb.dtype)
                ltrb = self.refine(reg_feature, ltrb, points, float(stride))
            ltrbs.append(ltrb)
        return logits, ltrbs, ctrs
