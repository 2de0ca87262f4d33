"""Task-collaborative Weight Generation (TWG), METHODS.md §1.3.

``P = concat(p_c^t, p_r^t, p_c^s, p_r^s)`` per level -> global average pool -> FC -> ReLU -> FC
-> softmax over 2 -> ``(T^0, T^1)``, one pair per image and level. One small network is shared by
every level (the pooled maps of each level give that level its own weights).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .losses import TaskMaps


class TaskWeightGenerator(nn.Module):
    """Maps pooled task probabilities ``[..., 4]`` to task weights ``[..., 2]`` that sum to 1.

    ``min_weight`` m bounds each weight to ``[m, 1 - m]``: ``T = m + (1 - 2m) * softmax(z)``.
    The last layer starts at zero, so the first weights are exactly ``(0.5, 0.5)``.
    """

    def __init__(self, hidden_dim: int = 16, min_weight: float = 0.1, detach_inputs: bool = True) -> None:
        super().__init__()
        if not 0.0 <= min_weight < 0.5:
            raise ValueError(f"min_weight must be in [0, 0.5), got {min_weight}")
        self.fc1 = nn.Linear(4, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, 2)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.min_weight = float(min_weight)
        self.detach_inputs = detach_inputs

    def forward(self, pooled: Tensor) -> Tensor:
        z = self.fc2(torch.relu(self.fc1(pooled)))
        return self.min_weight + (1.0 - 2.0 * self.min_weight) * z.softmax(dim=-1)

    def weights_for(self, teacher: Sequence[TaskMaps], student: Sequence[TaskMaps]) -> Tensor:
        """Task weights ``[B, L, 2]`` for the levels of one batch."""
        pooled = torch.stack(
            [
                torch.stack([t.p_c, t.p_r, s.p_c, s.p_r], dim=1).flatten(2).mean(dim=2)
                for t, s in zip(teacher, student)
            ],
            dim=1,
        )  # [B, L, 4]
        if self.detach_inputs:
            pooled = pooled.detach()
        return self(pooled.to(self.fc1.weight.dtype))
