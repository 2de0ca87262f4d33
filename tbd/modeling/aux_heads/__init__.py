"""Training-only auxiliary one-to-many heads (Co-DETR's collaborative hybrid assignment) for any
dense student: ``MODEL.AUX_HEADS.NAMES`` among ``atss`` and ``rcnn``. See docs/HEADS.md."""

from tbd.modeling.aux_heads.attach import attach_aux_heads
from tbd.modeling.aux_heads.base import AuxHead, AuxOutput, AuxPositives
from tbd.modeling.aux_heads.build import build_aux_heads
from tbd.modeling.aux_heads.config import add_aux_heads_config

__all__ = [
    "AuxHead",
    "AuxOutput",
    "AuxPositives",
    "add_aux_heads_config",
    "attach_aux_heads",
    "build_aux_heads",
]
