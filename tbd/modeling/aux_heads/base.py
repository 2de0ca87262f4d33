"""The interface every auxiliary one-to-many head implements (shared with Co-DETR, issue 17).

An auxiliary head is trained beside a detector's own head on the same pyramid features and
dropped at inference (Co-DETR's collaborative hybrid assignment, METHODS.md §5). It takes the
levels finest first, returns its weighted losses and, per image, the positives of its one-to-many
assignment (Co-DETR turns those into customised positive queries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from detectron2.structures import Instances
from torch import Tensor, nn


@dataclass
class AuxPositives:
    """One image's positives of an auxiliary head's one-to-many assignment (for Co-DETR's
    customised positive queries). N = number of positives in this image."""

    boxes: Tensor  # (N, 4) xyxy, input-image pixels: the positive anchors (ATSS) or proposals (RCNN)
    gt_boxes: Tensor  # (N, 4) xyxy: the GT box each positive was assigned to
    gt_classes: Tensor  # (N,) long: that GT's class
    levels: Tensor  # (N,) long: pyramid level index (0 = finest level given to the head)
    locations: Tensor  # (N,) long: flat index y * W_l + x of the positive's cell on its level

    @classmethod
    def empty(cls, device: torch.device | str | None = None) -> AuxPositives:
        box = torch.zeros((0, 4), device=device)
        idx = torch.zeros((0,), dtype=torch.long, device=device)
        return cls(box, box.clone(), idx, idx.clone(), idx.clone())

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass
class AuxOutput:
    losses: dict[str, Tensor]  # already multiplied by the head's weight; keys "loss_aux_<name>_<term>"
    positives: list[AuxPositives]  # one per image (empty tensors when none)


class AuxHead(nn.Module):
    """Training-only head on a list of pyramid features (strides given at construction).

    Subclasses set ``name`` and implement :meth:`forward`; ``weight`` multiplies every loss.
    """

    name: str = ""

    def __init__(self, strides: list[int], weight: float) -> None:
        super().__init__()
        self.strides = [int(s) for s in strides]
        self.weight = float(weight)

    def forward(
        self, features: list[Tensor], image_sizes: list[tuple[int, int]], gt_instances: list[Instances]
    ) -> AuxOutput:
        raise NotImplementedError

    def loss_key(self, term: str) -> str:
        return f"loss_aux_{self.name}_{term}"

    def check_features(self, features: list[Tensor]) -> None:
        if len(features) != len(self.strides):
            raise ValueError(
                f"auxiliary head {self.name!r} was built for {len(self.strides)} levels (strides "
                f"{self.strides}) but got {len(features)} feature maps"
            )


def cell_locations(
    centers: Tensor, levels: Tensor, strides: list[int], sizes: list[tuple[int, int]]
) -> Tensor:
    """Flat index ``y * W_l + x`` of the cell holding each ``(x, y)`` centre on its level (clamped)."""
    stride = torch.tensor(strides, device=centers.device, dtype=centers.dtype)[levels]
    h = torch.tensor([s[0] for s in sizes], device=centers.device)[levels]
    w = torch.tensor([s[1] for s in sizes], device=centers.device)[levels]
    x = torch.minimum(torch.div(centers[:, 0], stride, rounding_mode="floor").long().clamp(min=0), w - 1)
    y = torch.minimum(torch.div(centers[:, 1], stride, rounding_mode="floor").long().clamp(min=0), h - 1)
    return y * w + x
