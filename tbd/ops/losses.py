"""Classification losses in the focal family, shared by the TAL, ET and DW heads.

All take raw logits and return element-wise losses (no reduction): the caller weights and
normalises. Targets are never differentiated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """RetinaNet focal loss with hard ``{0, 1}`` targets; ``alpha < 0`` disables the balance term."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def quality_focal_loss(logits: Tensor, soft_targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss with soft targets: ``|t - s|^gamma * BCE(s, t)``.

    With ``t = 0`` this is the negative term ``s^gamma * BCE(s, 0)``, so one call covers the
    positives (``t = t_hat``) and the negatives of task-aligned learning.
    """
    targets = soft_targets.detach()
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (targets - p).abs().pow(gamma) * ce


def varifocal_loss(logits: Tensor, iou_targets: Tensor, alpha: float = 0.75, gamma: float = 2.0) -> Tensor:
    """Varifocal loss: positives (``q > 0``) weighted by ``q``, negatives by ``alpha * p^gamma``."""
    q = iou_targets.detach()
    p = logits.sigmoid()
    weight = torch.where(q > 0, q, alpha * p.detach().pow(gamma))
    ce = F.binary_cross_entropy_with_logits(logits, q, reduction="none")
    return weight * ce


def distribution_focal_loss(bin_logits: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss for one side: ``bin_logits [..., R+1]``, continuous ``target [...]``.

    The target (in bin units, ``0 <= target <= R``) is spread over its two neighbouring bins
    with linear weights; the loss is their weighted cross-entropy.
    """
    reg_max = bin_logits.shape[-1] - 1
    t = target.detach().clamp(0, reg_max - 1e-4)
    left = t.floor().long()
    right = left + 1
    w_left = right.to(t.dtype) - t
    w_right = t - left.to(t.dtype)
    logp = F.log_softmax(bin_logits, dim=-1)
    return -(
        logp.gather(-1, left.unsqueeze(-1)).squeeze(-1) * w_left
        + logp.gather(-1, right.unsqueeze(-1)).squeeze(-1) * w_right
    )
