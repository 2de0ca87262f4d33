"""What CoDETR needs from the auxiliary one-to-many heads.

The two dataclasses are a mirror of tbd.modeling.aux.base; the lead replaces them by an import at
merge (see /work/notes/AUX_CONTRACT.md). ``AUX_HEADS_BUILDER`` is the wiring point: ``None`` here
(CoDETR then trains without auxiliary heads, i.e. as Deformable-DETR++); at merge it becomes
``tbd.modeling.aux.build_aux_heads``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from detectron2.config import CfgNode
from detectron2.structures import Instances
from torch import Tensor, nn


# --- mirror of tbd.modeling.aux.base; the lead replaces it by an import at merge ---------------
@dataclass
class AuxPositives:
    """One image's positives of an auxiliary head's one-to-many assignment (for Co-DETR's
    customised positive queries). N = number of positives in this image."""

    boxes: Tensor  # (N, 4) xyxy, input-image pixels: the positive anchors / proposals = B_i^pos
    gt_boxes: Tensor  # (N, 4) xyxy: the GT box each positive was assigned to
    gt_classes: Tensor  # (N,) long: that GT's class
    levels: Tensor  # (N,) long: pyramid level index (0 = finest level given to the head)
    locations: Tensor  # (N,) long: flat index y*W_l + x of the positive's cell on its level


@dataclass
class AuxOutput:
    losses: dict[str, Tensor]  # already multiplied by the head's own weight; "loss_aux_<name>_<term>"
    positives: list[AuxPositives]  # one per image (empty tensors when none)


# --- end of mirror ----------------------------------------------------------------------------


class AuxHead(Protocol):
    """Training-only head on a list of pyramid features (strides given at construction)."""

    name: str

    def __call__(
        self, features: list[Tensor], image_sizes: list[tuple[int, int]], gt_instances: list[Instances]
    ) -> AuxOutput: ...


#: ``builder(cfg, in_channels, strides) -> nn.ModuleList`` of :class:`AuxHead` modules
AuxHeadsBuilder = Callable[[CfgNode, int, list[int]], nn.ModuleList]

#: the builder CoDETR uses when none is passed to it; wired to tbd.modeling.aux at merge
AUX_HEADS_BUILDER: Optional[AuxHeadsBuilder] = None
