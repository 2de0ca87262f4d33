"""Peer feature-distillation baselines, computed from the same probed levels as TBD.

Two published baselines, implemented as losses on the per-level feature distance
``d_l = sum_c (F^t - phi(F^s))^2`` (:func:`tbd.distill.losses.feature_distance`, ``[B, H, W]``):

- ``mimic_mse``: plain FPN feature mimicking. Every location counts the same:
  ``L = mean_l mean_{i,j} d_l`` (mean over positions, averaged over the distilled levels).
- ``cls_mask_mimic``: the classification-aware mask of the TBD paper's eq. 1 (the prior work TFD
  is compared against). The teacher's classification map ``p_c^t`` is the spatial weight,
  normalised by its sum: ``L = sum_l sum_{i,j} p_c^t d_l / sum_{i,j} p_c^t``. This is TFD's
  classification term alone, with weight 1 and no TWG.

Both are averaged over the images of the batch; no harmony distillation is added. Teacher
quantities are detached here, like in :mod:`tbd.distill.losses`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .keys import METHODS, PEER_METHODS  # noqa: F401  (METHODS: also tbd.distill.peers.METHODS)
from .losses import weighted_spatial_mean


def _apply_gates(distances: Sequence[Tensor], gates: Sequence[Tensor] | None) -> Sequence[Tensor]:
    """``g_l * d_l`` per level (the student-aware gate of ``DISTILL.GATE``, detached), or ``d_l``."""
    if gates is None:
        return distances
    return [d * g.detach().to(d.dtype) for d, g in zip(distances, gates)]


def mimic_mse_loss(distances: Sequence[Tensor], gates: Sequence[Tensor] | None = None) -> Tensor:
    """Plain FPN mimicking: per level the mean of ``g d_l`` over locations, averaged over levels and images."""
    if not distances:
        raise ValueError("mimic_mse_loss needs at least one level")
    distances = _apply_gates(distances, gates)
    per_level = torch.stack([d.flatten(1).mean(dim=1) for d in distances], dim=1)  # [B, L]
    return per_level.mean(dim=1).mean()


def cls_mask_mimic_loss(
    distances: Sequence[Tensor], teacher_pc: Sequence[Tensor], gates: Sequence[Tensor] | None = None
) -> Tensor:
    """Paper eq. 1: ``g d_l`` weighted by the teacher's ``p_c`` (normalised by its sum), summed over levels.

    A level whose ``p_c^t`` sums to 0 contributes 0 (never NaN).
    """
    if len(distances) != len(teacher_pc) or not distances:
        raise ValueError(
            f"need one p_c map per level, got {len(distances)} distances, {len(teacher_pc)} maps"
        )
    distances = _apply_gates(distances, gates)
    per_level = torch.stack(
        [weighted_spatial_mean(d, pc.detach()) for d, pc in zip(distances, teacher_pc)], dim=1
    )  # [B, L]
    return per_level.sum(dim=1).mean()


def peer_loss(
    method: str,
    distances: Sequence[Tensor],
    teacher_pc: Sequence[Tensor] | None = None,
    gates: Sequence[Tensor] | None = None,
) -> Tensor:
    """The unweighted loss of peer ``method`` (one of :data:`PEER_METHODS`), optionally gated."""
    if method == "mimic_mse":
        return mimic_mse_loss(distances, gates)
    if method == "cls_mask_mimic":
        if teacher_pc is None:
            raise ValueError("cls_mask_mimic needs the teacher's p_c maps")
        return cls_mask_mimic_loss(distances, teacher_pc, gates)
    raise ValueError(f"unknown peer method {method!r}; expected one of {PEER_METHODS}")
