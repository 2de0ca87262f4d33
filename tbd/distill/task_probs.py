"""Task probabilities p_c, p_r and the harmony score (METHODS.md §1.1-1.2).

Dense predictions come location-major: ``logits [B, H, W, A, K]`` and decoded boxes
``[B, H, W, A, 4]`` (absolute ``x1y1x2y2`` in input-image pixels). Every map returned here is
``[B, H, W]``: one value per image and location.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tbd.ops.boxes import aligned_iou, best_iou_match

from .keys import PC_MODES


def max_logit(logits: Tensor) -> Tensor:
    """Largest raw logit over the ``K`` classes and ``A`` anchors of each location -> ``[B, H, W]``."""
    return logits.flatten(-2).amax(dim=-1)


def classification_probability(logits: Tensor, mode: str = "sigmoid") -> Tensor:
    """p_c: the max logit of each location, normalised to ``[0, 1]`` according to ``mode``.

    - ``"spatial_softmax"``: the paper's literal softmax over the ``H x W`` locations of a level
      (sums to 1 per image and level, so each value is about ``1 / (H W)``).
    - ``"softmax_max1"``: the same spatial softmax rescaled so the map's maximum is 1,
      ``exp(x - max x)``: scale-aware, keeps the softmax's relative shape.
    - ``"sigmoid"``: the per-location sigmoid of the max logit (the detector's own score).
    """
    x = max_logit(logits)
    if mode == "sigmoid":
        return x.sigmoid()
    flat = x.flatten(1)
    if mode == "spatial_softmax":
        return flat.softmax(dim=1).view_as(x)
    if mode == "softmax_max1":
        return (flat - flat.amax(dim=1, keepdim=True)).exp().view_as(x)
    raise ValueError(f"unknown p_c mode {mode!r}; expected one of {PC_MODES}")


#: default bound on the elements of one no-grad ``[B, anchors, GT chunk]`` IoU block of p_r
#: (2**20 pairs: ~4 MiB per intermediate, ~50 MiB for the whole IoU computation)
PR_MAX_CHUNK_ELEMENTS = 2**20


def regression_probability(
    boxes: Tensor, gt_boxes: Tensor, gt_mask: Tensor, max_chunk_elements: int = PR_MAX_CHUNK_ELEMENTS
) -> Tensor:
    """p_r: for each location, max over its ``A`` decoded boxes and the image's GTs of the IoU.

    ``boxes [B, H, W, A, 4]``, ``gt_boxes [B, G, 4]`` padded, ``gt_mask [B, G]`` (False on
    padding). An image without GT gets 0 everywhere. Differentiable in ``boxes``.

    Memory is ``O(B H W A)``: the best GT of each box is found without gradient
    (:func:`tbd.ops.boxes.best_iou_match`, in blocks of GTs), and the differentiable IoU is computed once per box,
    with that GT. The max over GTs passes its gradient to its argmax only, so value and gradient
    are those of the dense ``max_g IoU(box, g)`` (:func:`tbd.distill.testing.dense_regression_probability`).
    """
    b, h, w, a, _ = boxes.shape
    if gt_boxes.shape[1] == 0:
        return boxes.new_zeros((b, h, w))
    flat = boxes.reshape(b, h * w * a, 4)
    gt_boxes = gt_boxes.to(boxes.dtype)
    _, index = best_iou_match(flat.detach(), gt_boxes, gt_mask, max_chunk_elements=max_chunk_elements)
    matched = gt_boxes.gather(1, index[..., None].expand(-1, -1, 4))  # [B, HWA, 4]
    iou = aligned_iou(flat, matched)
    iou = torch.where(gt_mask.any(dim=1, keepdim=True), iou, torch.zeros_like(iou))
    return iou.view(b, h, w, a).amax(dim=-1)


def harmony_score(p_c: Tensor, p_r: Tensor) -> Tensor:
    """HS = 1 - tanh(|p_r - p_c|), in ``(0, 1]``; 1 where the two tasks agree."""
    return 1.0 - torch.tanh((p_r - p_c).abs())
