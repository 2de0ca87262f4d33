"""The DW training loss over a padded batch: candidates, dual weights, the three loss terms."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from torch import Tensor

from tbd.modeling.dw_weights import (
    center_prior,
    class_negative_probability,
    negative_probability,
    negative_weights,
    positive_weights,
)
from tbd.ops.boxes import aligned_iou, giou_loss, ltrb_decode, points_in_boxes

_LN2 = math.log(2.0)
#: smallest ``1 - s`` (equivalently ``-log s``) the background term sees. Its gradient with respect
#: to ``log s`` is about ``1 / (1 - s)``, and the C classes of a location share one centerness
#: logit, whose gradient sums C of them before the chain rule brings it back to O(1): at 1e-38
#: (the former floor) four classes near s = 1 overflowed float32 to inf; 1e-30 leaves room for
#: ~1e8 classes. The term is therefore capped at -log(1e-30) = 69.1 (and at ``max_value``).
_MIN_ONE_MINUS_P = 1e-30


def neg_log_one_minus_exp(log_p: Tensor, max_value: float = 100.0) -> Tensor:
    """``-log(1 - exp(log_p))`` for ``log_p <= 0``, stable at both ends, capped at ``max_value``.

    This is the background cross-entropy ``-log(1 - s)`` of a probability known by its log, such
    as the joint score ``s = sigmoid(cls) * sigmoid(ctr)``. The cap plays the part of the -100
    clamp of ``F.binary_cross_entropy``; in practice it is ``min(max_value, 69.1)`` (see
    ``_MIN_ONE_MINUS_P``), and beyond it the gradient is 0, as beyond that clamp.
    """
    x = log_p.clamp(max=-max(math.exp(-max_value), _MIN_ONE_MINUS_P))
    near_one = x > -_LN2
    # each branch only ever sees inputs where it is well-conditioned, so no inf/NaN gradients leak
    a = torch.log(-torch.expm1(torch.where(near_one, x, torch.full_like(x, -_LN2))))
    b = torch.log1p(-torch.exp(torch.where(near_one, torch.full_like(x, -_LN2), x)))
    return -torch.where(near_one, a, b).clamp(min=-max_value)


def _mean_over_workers(value: Tensor) -> Tensor:
    """Average a scalar over DDP workers (identity with one process)."""
    if comm.get_world_size() > 1 and dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value = value / comm.get_world_size()
    return value


@dataclass
class DWLossConfig:
    """Hyper-parameters of the DW loss (``MODEL.DW.*``; defaults = the reference code)."""

    num_classes: int
    prior_sigma: float = 1.11
    loc_exponent: float = 5.0  # p_loc = exp(-k * L_GIoU)
    pos_mu: float = 5.0  # numerator exponent of the positive weight
    pos_mu_norm: float = 3.0  # denominator (normaliser) exponent
    neg_iou_low: float = 0.5
    neg_power: float = 2.0
    neg_gamma: float = 2.0  # I_neg = s^gamma
    cls_pos_weight: float = 0.25
    loc_weight: float = 1.25  # 0.25 * 5: the reference writes the GIoU term as BCE(exp(-5 L), 1)
    cls_neg_weight: float = 1.0


class DWLoss:
    """Computes the DW losses for one batch (all images at once, GTs padded and masked).

    Inputs (``P`` = every point of every level, concatenated):
    ``logits [B, P, C]``, ``ltrb [B, P, 4]`` (pixels), ``ctr_logits [B, P]``, ``points [P, 2]``,
    ``point_strides [P]``, ``gt_boxes [B, G, 4]``, ``gt_labels [B, G]``, ``gt_mask [B, G]``.

    Terms (the reference's three, same normalisers):
    - ``loss_dw_cls_pos = a * sum w_pos * -log s_gt / #GT``: joint score at the GT's class, target 1;
    - ``loss_dw_loc = b * sum w_pos * L_GIoU / #GT``;
    - ``loss_dw_cls_neg = c * sum w_neg * -log(1 - s) / sum(1 - P_neg)`` over every point and class.
    ``s = sigmoid(cls) * sigmoid(ctr)``; ``w_pos``, ``w_neg`` and every IoU are detached.
    """

    def __init__(self, cfg: DWLossConfig) -> None:
        self.cfg = cfg

    def __call__(
        self,
        logits: Tensor,
        ltrb: Tensor,
        ctr_logits: Tensor,
        points: Tensor,
        point_strides: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
    ) -> Dict[str, Tensor]:
        c = self.cfg
        b, p, _ = logits.shape
        g = gt_boxes.shape[1]
        candidates = points_in_boxes(points, gt_boxes) & gt_mask[:, None, :]  # [B, P, G]
        prior = center_prior(points, point_strides, gt_boxes, candidates, c.prior_sigma)

        pred_boxes = ltrb_decode(points, ltrb)[:, :, None, :]  # [B, P, 1, 4]
        targets = gt_boxes[:, None, :, :]  # [B, 1, G, 4]
        reg_loss = giou_loss(pred_boxes, targets)  # [B, P, G]
        with torch.no_grad():
            ious = aligned_iou(pred_boxes, targets) * candidates

        log_s = F.logsigmoid(logits) + F.logsigmoid(ctr_logits)[..., None]  # [B, P, C]
        label_index = gt_labels.clamp(min=0)[:, None, :].expand(b, p, g)
        log_s_gt = log_s.gather(2, label_index)  # [B, P, G]

        with torch.no_grad():
            p_pos = log_s_gt.exp() * torch.exp(-c.loc_exponent * reg_loss)
            w_pos = positive_weights(p_pos, prior, c.pos_mu, c.pos_mu_norm)
            pair_p_neg = negative_probability(ious, candidates, c.neg_iou_low, c.neg_power)
            p_neg = class_negative_probability(pair_p_neg, gt_labels, c.num_classes)
            w_neg = negative_weights(p_neg, log_s.exp(), c.neg_gamma)

        pos_norm = _mean_over_workers(gt_mask.sum().to(logits.dtype)).clamp(min=1.0)
        neg_norm = _mean_over_workers((1.0 - p_neg).sum()).clamp(min=1.0)
        loss_pos = (w_pos * -log_s_gt).sum() / pos_norm
        loss_loc = (w_pos * reg_loss).sum() / pos_norm
        loss_neg = (w_neg * neg_log_one_minus_exp(log_s)).sum() / neg_norm

        self.last_stats = {
            "num_candidates": candidates.sum().item() / max(b, 1),
            "pos_weight_sum": w_pos.sum().item() / max(float(gt_mask.sum()), 1.0),
            "neg_norm": float(neg_norm),
            "mean_candidate_iou": (ious.sum() / candidates.sum().clamp(min=1)).item(),
        }
        return {
            "loss_dw_cls_pos": c.cls_pos_weight * loss_pos,
            "loss_dw_loc": c.loc_weight * loss_loc,
            "loss_dw_cls_neg": c.cls_neg_weight * loss_neg,
        }
