"""The dense form of the DW loss: every pairwise quantity as a ``[B, P, G]`` tensor.

It is the yardstick of :class:`tbd.modeling.dw.loss.DWLoss`, which keeps only the candidate pairs
(tests check that both agree in values and gradients; ``scripts/bench_dw_weights.py`` compares their
time and memory). Its memory grows with ``P x G``: never use it for training.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from tbd.modeling.dw.loss import DWLossConfig, neg_log_one_minus_exp
from tbd.modeling.dw.weights import (
    center_prior,
    class_negative_probability,
    negative_probability,
    negative_weights,
    positive_weights,
)
from tbd.ops.boxes import aligned_iou, giou_loss, ltrb_decode, points_in_boxes


def dense_dw_loss(cfg: DWLossConfig, *inputs: Tensor) -> Dict[str, Tensor]:
    """Same contract and result as ``DWLoss(cfg)(*inputs)`` (one process: no DDP averaging).

    ``inputs``: its ``logits, ltrb, ctr_logits, points, point_strides, gt_boxes, gt_labels, gt_mask``.
    """
    logits, ltrb, ctr_logits, points, point_strides, gt_boxes, gt_labels, gt_mask = inputs
    c = cfg
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

    pos_norm = gt_mask.sum().to(logits.dtype).clamp(min=1.0)
    neg_norm = (1.0 - p_neg).sum().clamp(min=1.0)
    return {
        "loss_dw_cls_pos": c.cls_pos_weight * (w_pos * -log_s_gt).sum() / pos_norm,
        "loss_dw_loc": c.loc_weight * (w_pos * reg_loss).sum() / pos_norm,
        "loss_dw_cls_neg": c.cls_neg_weight * (w_neg * neg_log_one_minus_exp(log_s)).sum() / neg_norm,
    }
