"""The weighting functions of dual weighting (DW, CVPR 2022), as pure tensor functions.

Two forms of each pairwise function:

- the *pair* form (``pair_*``), used by the loss: a flat list of ``N`` candidate (image, point, GT)
  pairs, each with its segment id ``seg = image * G + gt`` (its GT's candidate set); per-GT sums,
  minima and maxima are segment reductions. Memory is ``O(N)``, the candidates only;
- the *dense* form, on a whole padded batch: ``B`` images, ``P`` points (all FPN levels
  concatenated), ``G`` ground-truth slots; pairwise quantities are ``[B, P, G]`` and every pair
  outside the candidate mask is neutral. The reference of the pair form (tests, benchmarks).

Per-class quantities are ``[B, P, C]``. The weights are constants of the loss: every function here
returns detached tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: guards the divisions of the reference implementation (positive normalisation, min-max)
EPS = 1e-12


@torch.no_grad()
def center_prior(
    points: Tensor, point_strides: Tensor, gt_boxes: Tensor, candidates: Tensor, sigma: float = 1.11
) -> Tensor:
    """Gaussian centre prior of every (point, GT) pair, zero outside the candidate set.

    ``prior = exp(-|(p - c_g) / stride_p|^2 / (2 sigma^2))``: the distance to the GT centre is
    measured in units of the point's own stride, so every level prefers its points nearest the
    centre. ``points [P, 2]``, ``point_strides [P]``, ``gt_boxes [B, G, 4]``,
    ``candidates [B, P, G]`` (bool) -> ``[B, P, G]``.
    """
    centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) * 0.5  # [B, G, 2]
    delta = (points[None, :, None, :] - centers[:, None, :, :]) / point_strides[None, :, None, None]
    prior = torch.exp(-delta.pow(2).sum(dim=-1) / (2.0 * sigma * sigma))
    return prior * candidates.to(prior.dtype)


@torch.no_grad()
def pair_center_prior(points: Tensor, strides: Tensor, gt_boxes: Tensor, sigma: float = 1.11) -> Tensor:
    """:func:`center_prior` of ``N`` pairs: ``points [N, 2]``, ``strides [N]``, ``gt_boxes [N, 4]`` -> ``[N]``."""
    centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) * 0.5
    delta = (points - centers) / strides[:, None]
    return torch.exp(-delta.pow(2).sum(dim=-1) / (2.0 * sigma * sigma))


def _segment_reduce(values: Tensor, segment: Tensor, num_segments: int, reduce: str, init: float) -> Tensor:
    out = values.new_full((num_segments,), init)
    return out.scatter_reduce_(0, segment, values, reduce=reduce, include_self=True)


@torch.no_grad()
def pair_positive_weights(
    p_pos: Tensor, prior: Tensor, segment: Tensor, num_segments: int, mu: float = 5.0, mu_norm: float = 3.0
) -> Tensor:
    """:func:`positive_weights` of ``N`` candidate pairs ``[N]``, normalised over each ``segment``."""
    p = p_pos.detach()
    base = p * prior
    num = torch.exp(mu * p) * base
    den = _segment_reduce(torch.exp(mu_norm * p) * base, segment, num_segments, "sum", 0.0)
    return num / den.clamp(min=EPS)[segment]


@torch.no_grad()
def pair_negative_probability(
    ious: Tensor, segment: Tensor, num_segments: int, iou_low: float = 0.5, power: float = 2.0
) -> Tensor:
    """:func:`negative_probability` of ``N`` candidate pairs ``[N]`` (min-max over each ``segment``)."""
    t = (ious.pow(power) - 1.0) / (iou_low**power - 1.0)
    t_min = _segment_reduce(t, segment, num_segments, "amin", math.inf)[segment]
    t_top = _segment_reduce(t, segment, num_segments, "amax", -math.inf)[segment].clamp(max=1.0)
    y = (t - t_min + EPS) / (t_top - t_min + EPS)
    return torch.where(ious < iou_low, torch.ones_like(y), y)


@torch.no_grad()
def pair_class_negative_probability(
    pair_p_neg: Tensor, image: Tensor, point: Tensor, label: Tensor, shape: tuple[int, int, int]
) -> Tensor:
    """:func:`class_negative_probability` from ``N`` candidate pairs -> ``[B, P, C]`` (1 where no GT claims)."""
    b, p, c = shape
    out = pair_p_neg.new_ones(b * p * c)
    out.scatter_reduce_(0, (image * p + point) * c + label, pair_p_neg, reduce="amin", include_self=True)
    return out.view(b, p, c)


@torch.no_grad()
def positive_weights(p_pos: Tensor, prior: Tensor, mu: float = 5.0, mu_norm: float = 3.0) -> Tensor:
    """Positive weight of each (point, GT) pair, normalised over that GT's candidate set.

    ``w = exp(mu p) p prior / sum_candidates exp(mu_norm p) p prior`` with ``p = p_cls * p_loc``
    (the consistency of the two heads). ``mu != mu_norm`` (5 vs 3) as in the reference code.
    ``prior`` is zero outside the candidate set, so the sum runs over the candidates only.
    ``p_pos, prior [B, P, G]`` -> ``[B, P, G]``; a GT without candidates gets all-zero weights.
    """
    p = p_pos.detach()
    base = p * prior
    num = torch.exp(mu * p) * base
    den = (torch.exp(mu_norm * p) * base).sum(dim=1, keepdim=True)
    return num / den.clamp(min=EPS)


@torch.no_grad()
def negative_probability(
    ious: Tensor, candidates: Tensor, iou_low: float = 0.5, power: float = 2.0
) -> Tensor:
    """P_neg: the probability that a candidate is a negative, from its IoU with the GT.

    ``t(x) = (x^power - 1) / (iou_low^power - 1)`` (``t(iou_low) = 1``, ``t(1) = 0``), min-max
    normalised per GT over its candidates: ``(t - min t) / (min(1, max t) - min t)``; every IoU
    below ``iou_low`` gives 1. So the best candidate of a GT gets ~0 and the curve decreases on
    ``[iou_low, best IoU]``. Pairs outside the candidate set get 1 (plain negatives).
    ``ious, candidates [B, P, G]`` -> ``[B, P, G]`` in ``[0, 1]``.
    """
    t = (ious.pow(power) - 1.0) / (iou_low**power - 1.0)
    has_cand = candidates.any(dim=1, keepdim=True)
    t_min = torch.where(candidates, t, torch.full_like(t, math.inf)).amin(dim=1, keepdim=True)
    t_max = torch.where(candidates, t, torch.full_like(t, -math.inf)).amax(dim=1, keepdim=True)
    t_min = torch.where(has_cand, t_min, torch.zeros_like(t_min))
    t_top = torch.where(has_cand, t_max.clamp(max=1.0), torch.ones_like(t_max))
    y = (t - t_min + EPS) / (t_top - t_min + EPS)
    y = torch.where(ious < iou_low, torch.ones_like(y), y)
    return torch.where(candidates, y, torch.ones_like(y))


@torch.no_grad()
def class_negative_probability(pair_p_neg: Tensor, gt_labels: Tensor, num_classes: int) -> Tensor:
    """Scatter pairwise P_neg ``[B, P, G]`` onto classes -> ``[B, P, C]`` (1 where no GT claims).

    A point that is a candidate of several GTs of the same class takes the smallest P_neg: it is
    a false positive only if it matches none of them. (The reference code keeps whichever GT is
    written last; the minimum is the order-free version of the same rule.) Pairs outside the
    candidate set must carry 1 (as :func:`negative_probability` returns), padded labels may be -1.
    """
    b, p, g = pair_p_neg.shape
    index = gt_labels.clamp(min=0)[:, None, :].expand(b, p, g)
    out = pair_p_neg.new_ones((b, p, num_classes))
    return out.scatter_reduce(2, index, pair_p_neg, reduce="amin", include_self=True)


@torch.no_grad()
def negative_weights(p_neg: Tensor, scores: Tensor, gamma: float = 2.0) -> Tensor:
    """Negative weight ``P_neg * I_neg`` with the importance ``I_neg = s^gamma`` (s: joint score)."""
    return p_neg * scores.detach().pow(gamma)
