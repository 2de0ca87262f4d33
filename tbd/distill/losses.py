"""Harmony Distillation (HD) and Task-decoupled Feature Distillation (TFD), METHODS.md §1.2-1.3.

Per-level functions return one value per image (``[B]``); the ``*_loss`` functions sum the
levels and average over the images of the batch. Teacher quantities are detached here, so a
caller cannot leak gradient into the teacher by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .keys import FEATURE_NORMS, HD_MODES
from .task_probs import harmony_score

#: floor of the teacher energy a distance is divided by (an all-zero teacher map)
ENERGY_EPS = 1e-6
#: a teacher level whose energy is below this fraction of the image's most energetic distilled
#: level is flat (e.g. a GroupNorm over one cell per group): its relative error is undefined
FLAT_LEVEL_FRACTION = 1e-4


@dataclass
class TaskMaps:
    """The task probabilities of one model at one FPN level: ``p_c``, ``p_r`` both ``[B, H, W]``."""

    p_c: Tensor
    p_r: Tensor

    @property
    def hs(self) -> Tensor:
        return harmony_score(self.p_c, self.p_r)


def weighted_spatial_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``sum(w * v) / sum(w)`` over the locations of each image -> ``[B]``; 0 where ``sum(w) == 0``."""
    num = (weights * values).flatten(1).sum(dim=1)
    den = weights.flatten(1).sum(dim=1)
    safe = den > 0
    return torch.where(safe, num / torch.where(safe, den, torch.ones_like(den)), torch.zeros_like(num))


def _gated(values: Tensor, gate: Tensor | None) -> Tensor:
    return values if gate is None else values * gate.detach().to(values.dtype)


def hd_level_plain(hs_t: Tensor, hs_s: Tensor, gate: Tensor | None = None) -> Tensor:
    """Paper eq. 6 at one level: mean over locations of ``g |HS^t - HS^s|`` -> ``[B]`` (g = 1: no gate)."""
    return _gated((hs_t.detach() - hs_s).abs(), gate).flatten(1).mean(dim=1)


def iou_guided_weight(pr_t: Tensor, pc_t: Tensor, pc_s: Tensor) -> Tensor:
    """psi = p_r^t * sqrt(1 + |p_c^t - p_c^s|), a constant weight (no gradient)."""
    return (pr_t * torch.sqrt(1.0 + (pc_t - pc_s).abs())).detach()


def hd_level_iou_guided(teacher: TaskMaps, student: TaskMaps, gate: Tensor | None = None) -> Tensor:
    """IoU-guided HD at one level: ``sum psi g |HS^t - HS^s| / sum psi`` -> ``[B]`` (0 if sum psi = 0)."""
    psi = iou_guided_weight(teacher.p_r, teacher.p_c, student.p_c)
    return weighted_spatial_mean(_gated((teacher.hs.detach() - student.hs).abs(), gate), psi)


def harmony_distillation_loss(
    teacher: Sequence[TaskMaps],
    student: Sequence[TaskMaps],
    mode: str = "iou_guided",
    gates: Sequence[Tensor] | None = None,
) -> Tensor:
    """L_HD: the per-level terms summed over levels, averaged over images (unweighted by alpha).

    ``gates``: one detached ``[B, H, W]`` weight per level (:mod:`tbd.distill.gate`), or ``None``.
    """
    if mode not in HD_MODES:
        raise ValueError(f"unknown HD mode {mode!r}; expected one of {HD_MODES}")
    per_level = []
    for i, (t, s) in enumerate(zip(teacher, student)):
        gate = None if gates is None else gates[i]
        if mode == "plain":
            per_level.append(hd_level_plain(t.hs, s.hs, gate))
        else:
            per_level.append(hd_level_iou_guided(t, s, gate))
    return torch.stack(per_level, dim=0).sum(dim=0).mean()


def teacher_energy(f_t: Tensor) -> Tensor:
    """``mean_{i,j} sum_c (F^t)^2`` per image, ``[B]`` (no gradient)."""
    return f_t.detach().float().pow(2).sum(dim=1).flatten(1).mean(dim=1)


def feature_distance(
    f_t: Tensor,
    f_s: Tensor,
    norm: str = "none",
    max_energy: Tensor | None = None,
    energy: Tensor | None = None,
) -> Tensor:
    """``sum_c (F^t - phi(F^s))^2`` -> ``[B, H, W]``; ``f_s`` is the already adapted student feature.

    ``norm="teacher_energy"`` divides each image's map by the teacher's mean feature energy on that
    level, ``mean_{i,j} sum_c (F^t)^2`` (a constant: no gradient): the distance becomes a relative
    squared error, ~1 for a student feature of 0, whatever the teacher's feature scale. With
    ``max_energy`` (``[B]``, the image's largest energy over the distilled levels) a flat teacher
    level (energy below :data:`FLAT_LEVEL_FRACTION` of it) has distance 0 for that image: there is
    nothing to imitate there, and dividing by its near-zero energy would swamp every other loss.
    ``energy``: :func:`teacher_energy` of ``f_t`` when the caller already has it.
    """
    if norm not in FEATURE_NORMS:
        raise ValueError(f"unknown feature normalisation {norm!r}; expected one of {FEATURE_NORMS}")
    f_t = f_t.detach().to(f_s.dtype)
    d = (f_t - f_s).pow(2).sum(dim=1)
    if norm == "teacher_energy":
        if energy is None:
            energy = teacher_energy(f_t)
        scale = 1.0 / energy.clamp(min=ENERGY_EPS)
        if max_energy is not None:
            scale = torch.where(energy < FLAT_LEVEL_FRACTION * max_energy, torch.zeros_like(scale), scale)
        d = d * scale.to(d.dtype)[:, None, None]
    return d


@dataclass
class TFDTerms:
    """L_TFD and its parts (all scalars, task weights applied): ``loss = cls + reg``."""

    loss: Tensor
    cls: Tensor
    reg: Tensor


def tfd_loss(
    distances: Sequence[Tensor],
    teacher: Sequence[TaskMaps],
    task_weights: Tensor,
    gates: Sequence[Tensor] | None = None,
) -> TFDTerms:
    """L_TFD = sum_l T_l^0 * mean_{p_c^t}(d_l) + T_l^1 * mean_{p_r^t}(d_l), averaged over images.

    ``distances``: per level ``[B, H, W]`` (:func:`feature_distance`); ``task_weights``:
    ``[B, L, 2]`` (TWG output) or ``[2]`` (fixed omega_c, omega_r); ``gates``: one detached
    ``[B, H, W]`` weight per level multiplying ``d_l`` (the masks' sums stay the normalisers).
    """
    if gates is not None:
        distances = [_gated(d, g) for d, g in zip(distances, gates)]
    cls = torch.stack(
        [weighted_spatial_mean(d, t.p_c.detach()) for d, t in zip(distances, teacher)], dim=1
    )  # [B, L]
    reg = torch.stack([weighted_spatial_mean(d, t.p_r.detach()) for d, t in zip(distances, teacher)], dim=1)
    w = task_weights.to(cls.dtype)
    if w.dim() == 1:
        w = w.view(1, 1, 2)
    cls_term = (w[..., 0] * cls).sum(dim=1).mean()
    reg_term = (w[..., 1] * reg).sum(dim=1).mean()
    return TFDTerms(loss=cls_term + reg_term, cls=cls_term, reg=reg_term)
