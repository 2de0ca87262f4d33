"""Task probabilities p_c, p_r and the harmony score (METHODS.md §1.1-1.2).

Dense predictions come location-major: ``logits [B, H, W, A, K]`` and decoded boxes
``[B, H, W, A, 4]`` (absolute ``x1y1x2y2`` in input-image pixels). Every map returned here is
``[B, H, W]``: one value per image and location.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tbd.ops.boxes import pairwise_iou

from .config import PC_MODES


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


def regression_probability(boxes: Tensor, gt_boxes: Tensor, gt_mask: Tensor) -> Tensor:
    """p_r: for each location, max over its ``A`` decoded boxes and the image's GTs of the IoU.

    ``boxes [B, H, W, A, 4]``, ``gt_boxes [B, G, 4]`` padded, ``gt_mask [B, G]`` (False on
    padding). An image without GT gets 0 everywhere. Differentiable in ``boxes``.
    """
    b, h, w, a, _ = boxes.shape
    if gt_boxes.shape[1] == 0:
        return boxes.new_zeros((b, h, w))
    iou = pairwise_iou(boxes.reshape(b, h * w * a, 4), gt_boxes.to(boxes.dtype))  # [B, HWA, G]
    iou = iou.masked_fill(~gt_mask[:, None, :], 0.0)
    return iou.amax(dim=-1).view(b, h, w, a).amax(dim=-1)


def harmony_score(p_c: Tensor, p_r: Tensor) -> Tensor:
    """HS = 1 - tanh(|p_r - p_c|), in ``(0, 1]``; 1 where the two tasks agree."""
    return 1.0 - torch.tanh((p_r - p_c).abs())
