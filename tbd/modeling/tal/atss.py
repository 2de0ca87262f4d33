"""ATSS assignment for the warm-up iterations of TAL (TOOD trains its first epochs with it).

Anchor-free version: each point carries a square prior box of side ``anchor_scale * stride``.
Per level and GT, the ``topk`` points nearest to the GT centre are candidates; a candidate is
positive when its prior-box IoU is at least mean + std of its GT's candidate IoUs and its centre
lies inside the GT. Conflicts go to the highest prior IoU. The soft target of a positive is the
IoU of its *predicted* box with the GT (the quality-focal target), so the TAL losses apply as is.
Vectorised over images x GTs; one small loop over FPN levels.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tbd.modeling.tal.assigner import TALAssignment, _Candidates, resolve_candidates
from tbd.ops.boxes import aligned_iou, box_centers, pairwise_iou, points_in_boxes


class ATSSAssigner:
    def __init__(self, topk: int = 9, anchor_scale: float = 8.0, max_chunk_elements: int = 2**22) -> None:
        self.topk = topk
        self.anchor_scale = anchor_scale
        self.max_chunk_elements = max_chunk_elements

    def prior_boxes(self, points: Tensor, level_sizes: Sequence[int], strides: Sequence[int]) -> Tensor:
        half = torch.cat(
            [points.new_full((n,), 0.5 * self.anchor_scale * s) for n, s in zip(level_sizes, strides)]
        )[:, None]
        return torch.cat([points - half, points + half], dim=-1)

    @torch.no_grad()
    def __call__(
        self,
        pred_boxes: Tensor,
        points: Tensor,
        level_sizes: Sequence[int],
        strides: Sequence[int],
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        num_classes: int,
    ) -> TALAssignment:
        b, g = gt_labels.shape
        priors = self.prior_boxes(points, level_sizes, strides)
        centers = box_centers(gt_boxes)  # [B, G, 2]
        idx_parts = []
        start = 0
        for n in level_sizes:  # loop over FPN levels
            level = points[start : start + n][None].expand(b, -1, -1)
            k = min(self.topk, n)
            step = max(1, min(g, self.max_chunk_elements // max(1, b * n)))
            nearest = [  # blocks of GTs: the [B, g, n] distances stay bounded
                torch.cdist(centers[:, g0 : g0 + step], level).topk(k, dim=-1, largest=False).indices
                for g0 in range(0, max(g, 1), step)
            ]
            idx_parts.append(torch.cat(nearest, dim=1) + start)
            start += n
        index = torch.cat(idx_parts, dim=-1)  # [B, G, L*k]
        cand_priors = priors[index]  # [B, G, L*k, 4]
        iou = pairwise_iou(gt_boxes[:, :, None, :], cand_priors).squeeze(-2)  # [B, G, L*k]
        thresh = iou.mean(-1, keepdim=True) + iou.std(-1, keepdim=True)
        inside = points_in_boxes(points[index], gt_boxes[:, :, None, :]).squeeze(-1)  # [B, G, L*k]
        valid = (iou >= thresh) & inside & gt_mask[..., None]
        cand = _Candidates(index=index, valid=valid, iou=iou, metric=iou)
        out = resolve_candidates(cand, gt_boxes.float(), gt_labels, points.shape[0], num_classes)
        pred_iou = torch.where(out.fg_mask, aligned_iou(pred_boxes.detach().float(), out.boxes), 0.0)
        out.scores = pred_iou
        out.ious = pred_iou
        return out
