"""Student-aware gating of the distillation terms (``DISTILL.GATE``, METHODS.md §1.7): an experiment.

A gate is a detached weight ``g`` in ``[0, 1]`` per image and location of one FPN level, computed
from the teacher's and the student's task maps. Every distillation term multiplies its
per-location value by ``g`` and keeps its own normaliser (the mean over locations, ``sum psi``,
``sum p_c^t``, ...), so a gate can only remove distillation, never amplify it: with ``g = 1``
everywhere the term is the ungated one, with ``g = 0`` everywhere it is exactly 0.

``g = clamp((gap + m) / (2 m), 0, 1)`` with ``gap = HS^t - HS^s`` (``"harmony"``),
``gap = p_r^t - p_r^s`` (``"iou"``) or ``gap = q^t - q^s`` with ``q = sqrt(p_c p_r)`` (``"quality"``:
the geometric mean of score and IoU, high only where a prediction is both confident and well
placed): 1 where the teacher leads by at least ``m``, 0 where the student leads by at least ``m``,
a linear ramp between (0.5 at a tie). ``m = 0`` is a hard step (``g = 1`` where the teacher
strictly leads).

``"harmony"`` compares agreement, not quality: an untrained student, whose scores and IoUs are both
low, is "harmonious" (HS near 1) and counts as ahead of a trained teacher almost everywhere
(measured: METHODS.md §1.7). ``"quality"`` counts it as behind.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .keys import GATES
from .losses import TaskMaps


def ramp(gap: Tensor, margin: float) -> Tensor:
    """``clamp((gap + m) / (2 m), 0, 1)``; for ``m = 0`` the step ``gap > 0``. No gradient."""
    gap = gap.detach()
    if margin < 0:
        raise ValueError(f"the gate margin must be non-negative, got {margin}")
    if margin == 0:
        return (gap > 0).to(gap.dtype)
    return ((gap + margin) / (2.0 * margin)).clamp(0.0, 1.0)


def location_gate(mode: str, teacher: TaskMaps, student: TaskMaps, margin: float) -> Tensor | None:
    """The gate ``[B, H, W]`` of one level for ``DISTILL.GATE = mode``; ``None`` for ``"none"``."""
    if mode not in GATES:
        raise ValueError(f"unknown gate {mode!r}; expected one of {GATES}")
    if mode == "none":
        return None
    if mode == "harmony":
        gap = teacher.hs - student.hs
    elif mode == "iou":
        gap = teacher.p_r - student.p_r
    else:
        gap = prediction_quality(teacher) - prediction_quality(student)
    return ramp(gap, margin)


def prediction_quality(maps: TaskMaps) -> Tensor:
    """``q = sqrt(p_c p_r)`` per location (detached): high only where score and IoU are both high."""
    return (maps.p_c.detach() * maps.p_r.detach()).clamp_min(0.0).sqrt()


def level_gates(
    mode: str, teacher: Sequence[TaskMaps], student: Sequence[TaskMaps], margin: float
) -> list[Tensor] | None:
    """One gate per level (``None``: ungated)."""
    if mode == "none":
        return None
    return [location_gate(mode, t, s, margin) for t, s in zip(teacher, student)]  # type: ignore[misc]


def mean_gate(gates: Sequence[Tensor]) -> float:
    """The mean gate over every location of every level (a scalar to log)."""
    return float(torch.cat([g.flatten() for g in gates]).float().mean()) if gates else 1.0
