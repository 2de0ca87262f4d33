"""Box conversions, pairwise GIoU and the Hungarian one-to-one matcher of DETR.

Boxes in the set losses are normalised ``(cx, cy, w, h)`` (L1) and their ``(x1, y1, x2, y2)``
form (GIoU), as in DETR.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from tbd.ops.boxes import box_area, pairwise_iou

_EPS = 1e-7


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    c, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat([c - 0.5 * wh, c + 0.5 * wh], -1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) * 0.5, boxes[..., 2:] - boxes[..., :2]], -1)


def pairwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of every box of ``a [N, 4]`` with every box of ``b [M, 4]`` (xyxy) -> ``[N, M]``."""
    iou = pairwise_iou(a, b)
    lt_i = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb_i = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb_i - lt_i).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    hull = (
        torch.maximum(a[:, None, 2:], b[None, :, 2:]) - torch.minimum(a[:, None, :2], b[None, :, :2])
    ).clamp(min=0)
    hull_area = hull.prod(-1)
    return iou - (hull_area - union) / hull_area.clamp(min=_EPS)


def focal_class_cost(logits: Tensor, gt_classes: Tensor, alpha: float, gamma: float) -> Tensor:
    """Deformable DETR's classification cost ``[Q, G]``: the focal loss of calling query q's
    score for GT g's class positive minus that of calling it negative."""
    p = logits.sigmoid()[:, gt_classes]
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    neg = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
    return pos - neg


class HungarianMatcher:
    """One-to-one assignment of queries to GT boxes minimising
    ``w_cls * focal cost + w_l1 * L1(cxcywh) - w_giou * GIoU`` (scipy's ``linear_sum_assignment``)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, gt_classes: Tensor, gt_boxes: Tensor) -> Tensor:
        """``[Q, G]`` for one image: ``logits [Q, K]``, ``boxes [Q, 4]`` and ``gt_boxes [G, 4]`` cxcywh."""
        cost = self.cost_class * focal_class_cost(logits, gt_classes, self.alpha, self.gamma)
        cost = cost + self.cost_bbox * torch.cdist(boxes, gt_boxes, p=1)
        return cost - self.cost_giou * pairwise_giou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(gt_boxes))

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, boxes: Tensor, gt_classes: list[Tensor], gt_boxes: list[Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(query indices, GT indices)`` of the matched pairs (``min(Q, G)`` of them).

        ``logits [B, Q, K]``, ``boxes [B, Q, 4]``; per image ``gt_classes [G]``, ``gt_boxes [G, 4]``.
        All images' cost matrices are computed in one pass; only the assignment runs per image.
        """
        sizes = [len(c) for c in gt_classes]
        empty = torch.empty(0, dtype=torch.long, device=logits.device)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in sizes]
        b, q, _ = logits.shape
        all_cost = self.cost_matrix(
            logits.flatten(0, 1).float(),
            boxes.flatten(0, 1).float(),
            torch.cat(gt_classes),
            torch.cat(gt_boxes).float(),
        )
        all_cost = all_cost.view(b, q, -1).cpu()
        if not torch.isfinite(all_cost).all():
            raise FloatingPointError(
                "Hungarian matching: the cost matrix holds NaN/inf (diverged predictions?)"
            )
        result = []
        for i, cost in enumerate(all_cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(cost[i].numpy())
            result.append(
                (
                    torch.as_tensor(rows.astype(np.int64), device=logits.device),
                    torch.as_tensor(cols.astype(np.int64), device=logits.device),
                )
            )
        return result
