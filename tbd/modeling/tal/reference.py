"""A deliberately straightforward task-aligned assigner: Python loops over images, GTs and positives.

It is the yardstick of the vectorised :class:`tbd.modeling.tal.assigner.TaskAlignedAssigner` (tests check
that both agree; ``scripts/bench_tal_assigner.py`` times both). Never use it for training.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tbd.modeling.tal.assigner import TALAssignment
from tbd.ops.boxes import pairwise_iou, points_in_boxes


@torch.no_grad()
def reference_assign(
    pred_scores: Tensor,
    pred_boxes: Tensor,
    points: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    num_classes: int,
    topk: int = 13,
    alpha: float = 1.0,
    beta: float = 6.0,
) -> TALAssignment:
    """Same contract as ``TaskAlignedAssigner.__call__`` but with unpadded per-image GT lists."""
    b, num_points, _ = pred_scores.shape
    labels_out = torch.full((b, num_points), num_classes, dtype=torch.long)
    boxes_out = torch.zeros((b, num_points, 4))
    scores_out = torch.zeros((b, num_points))
    ious_out = torch.zeros((b, num_points))
    owner_out = torch.full((b, num_points), -1, dtype=torch.long)
    for i in range(b):
        best_iou = torch.full((num_points,), -1.0)
        owner = torch.full((num_points,), -1, dtype=torch.long)
        metric_of = torch.zeros(num_points)
        for g in range(int(gt_boxes[i].shape[0])):
            box = gt_boxes[i][g : g + 1].float()
            iou = pairwise_iou(box, pred_boxes[i].float())[0]
            inside = points_in_boxes(points.float(), box)[:, 0]
            metric = pred_scores[i, :, int(gt_labels[i][g])].float().pow(alpha) * iou.pow(beta)
            cand = torch.nonzero(inside & (metric > 0)).flatten()  # metric 0: never a positive
            if cand.numel() == 0:
                continue
            order = torch.argsort(metric[cand], descending=True, stable=True)[:topk]
            for a in cand[order].tolist():
                if iou[a] > best_iou[a]:  # strictly better: ties stay with the lower GT index
                    best_iou[a] = iou[a]
                    owner[a] = g
                    metric_of[a] = metric[a]
        for g in range(int(gt_boxes[i].shape[0])):
            mine = owner == g
            if not bool(mine.any()):
                continue
            max_t = metric_of[mine].max().clamp(min=1e-12)
            max_u = best_iou[mine].max()
            scores_out[i, mine] = metric_of[mine] / max_t * max_u
            ious_out[i, mine] = best_iou[mine]
            labels_out[i, mine] = int(gt_labels[i][g])
            boxes_out[i, mine] = gt_boxes[i][g].float()
        owner_out[i] = owner
    return TALAssignment(labels_out, boxes_out, scores_out, owner_out >= 0, owner_out, ious_out)
