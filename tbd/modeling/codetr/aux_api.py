"""What CoDETR needs from the auxiliary one-to-many heads (tbd.modeling.aux_heads).

The data types are tbd.modeling.aux_heads.base's. ``AUX_HEADS_BUILDER`` is what CoDETR builds its
heads with when none is passed to it: the heads of ``MODEL.AUX_HEADS.NAMES`` on its multi-scale
adapter's pyramid, for ``MODEL.CODETR.NUM_CLASSES`` classes. CoDETR weighs their losses by λ2 in
every decoder layer's term itself, so a head's own weight defaults to 1.0 here (``WEIGHTS`` empty),
not the 2.0 a dense student's heads get.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from detectron2.config import CfgNode
from detectron2.structures import Instances
from torch import Tensor, nn

from tbd.modeling.aux_heads.base import AuxOutput, AuxPositives

__all__ = ["AUX_HEADS_BUILDER", "AuxHead", "AuxHeadsBuilder", "AuxOutput", "AuxPositives", "codetr_aux_heads"]


class AuxHead(Protocol):
    """Training-only head on a list of pyramid features (strides given at construction)."""

    name: str

    def __call__(
        self, features: list[Tensor], image_sizes: list[tuple[int, int]], gt_instances: list[Instances]
    ) -> AuxOutput: ...


#: ``builder(cfg, in_channels, strides) -> nn.ModuleList`` of :class:`AuxHead` modules
AuxHeadsBuilder = Callable[[CfgNode, int, list[int]], nn.ModuleList]


def codetr_aux_heads(cfg: CfgNode, in_channels: int, strides: list[int]) -> nn.ModuleList:
    """The heads of ``MODEL.AUX_HEADS`` for a CoDETR (weight 1.0 each unless ``WEIGHTS`` says)."""
    from tbd.modeling.aux_heads import build_aux_heads

    names = list(cfg.MODEL.AUX_HEADS.NAMES)
    if names and not list(cfg.MODEL.AUX_HEADS.WEIGHTS):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.AUX_HEADS.WEIGHTS = [1.0] * len(names)
    return build_aux_heads(cfg, in_channels, strides, num_classes=int(cfg.MODEL.CODETR.NUM_CLASSES))


#: the builder CoDETR uses when none is passed to it
AUX_HEADS_BUILDER: Optional[AuxHeadsBuilder] = codetr_aux_heads
