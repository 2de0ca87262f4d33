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

from tbd.modeling.dw.weights import (
    negative_weights,
    pair_center_prior,
    pair_class_negative_probability,
    pair_negative_probability,
    pair_positive_weights,
)
from tbd.ops.boxes import aligned_iou, boxes_contain_points, giou_loss, ltrb_decode

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
    #: bound on one ``[B, G_chunk, P]`` boolean block of the candidate search (memory, not results)
    max_chunk_elements: int = 2**24


@torch.no_grad()
def candidate_pairs(
    points: Tensor, gt_boxes: Tensor, gt_mask: Tensor, max_chunk_elements: int = 2**24
) -> tuple[Tensor, Tensor, Tensor]:
    """DW's candidate set as pairs: ``(image, point, gt)`` index tensors ``[N]`` of every point
    strictly inside a real GT. The dense search is a one-byte mask per block of GTs holding at most
    ``max_chunk_elements`` pairs; what is kept is the ``N`` candidates."""
    b, g = gt_mask.shape
    p = points.shape[0]
    step = max(1, min(g, max_chunk_elements // max(1, b * p)))
    parts = []
    for g0 in range(0, g, step):  # blocks of GTs: bounded memory, not a per-GT loop
        inside = boxes_contain_points(gt_boxes[:, g0 : g0 + step], points)  # [B, g, P]
        inside &= gt_mask[:, g0 : g0 + step, None]
        bi, gi, pi = inside.nonzero(as_tuple=True)
        parts.append((bi, pi, gi + g0))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=points.device)
        return empty, empty, empty
    bi, pi, gi = (torch.cat(t) for t in zip(*parts))
    return bi, pi, gi


class DWLoss:
    """Computes the DW losses for one batch (all images at once, GTs padded and masked).

    Only the candidate pairs (a point strictly inside a real GT) carry a pairwise quantity, so
    memory grows with the number of candidates, not with ``P x G``; the dense ``[B, P, G]`` form
    (:func:`tbd.modeling.dw.reference.dense_dw_loss`) gives the same values.

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
        b, p, num_classes = logits.shape
        g = gt_boxes.shape[1]
        # the candidate (image, point, GT) pairs: every pairwise quantity below is [N], not [B, P, G]
        bi, pi, gi = candidate_pairs(points, gt_boxes, gt_mask, c.max_chunk_elements)
        segment = bi * g + gi  # each GT's candidate set
        pair_gt = gt_boxes[bi, gi]
        prior = pair_center_prior(points[pi], point_strides[pi], pair_gt, c.prior_sigma)

        pred_boxes = ltrb_decode(points[pi], ltrb[bi, pi])  # [N, 4]
        reg_loss = giou_loss(pred_boxes, pair_gt)  # [N]
        with torch.no_grad():
            ious = aligned_iou(pred_boxes, pair_gt)

        log_s = F.logsigmoid(logits) + F.logsigmoid(ctr_logits)[..., None]  # [B, P, C]
        pair_label = gt_labels[bi, gi].clamp(min=0)
        log_s_gt = log_s[bi, pi, pair_label]  # [N]

        with torch.no_grad():
            p_pos = log_s_gt.exp() * torch.exp(-c.loc_exponent * reg_loss)
            w_pos = pair_positive_weights(p_pos, prior, segment, b * g, c.pos_mu, c.pos_mu_norm)
            pair_p_neg = pair_negative_probability(ious, segment, b * g, c.neg_iou_low, c.neg_power)
            p_neg = pair_class_negative_probability(pair_p_neg, bi, pi, pair_label, (b, p, num_classes))
            w_neg = negative_weights(p_neg, log_s.exp(), c.neg_gamma)

        pos_norm = _mean_over_workers(gt_mask.sum().to(logits.dtype)).clamp(min=1.0)
        neg_norm = _mean_over_workers((1.0 - p_neg).sum()).clamp(min=1.0)
        loss_pos = (w_pos * -log_s_gt).sum() / pos_norm
        loss_loc = (w_pos * reg_loss).sum() / pos_norm
        loss_neg = (w_neg * neg_log_one_minus_exp(log_s)).sum() / neg_norm

        num_cand = bi.numel()
        self.last_stats = {
            "num_candidates": num_cand / max(b, 1),
            "pos_weight_sum": w_pos.sum().item() / max(float(gt_mask.sum()), 1.0),
            "neg_norm": float(neg_norm),
            "mean_candidate_iou": (ious.sum() / max(num_cand, 1)).item(),
        }
        return {
            "loss_dw_cls_pos": c.cls_pos_weight * loss_pos,
            "loss_dw_loc": c.loc_weight * loss_loc,
            "loss_dw_cls_neg": c.cls_neg_weight * loss_neg,
        }
