"""The backbone of a dense detector and the levels its shared head reads."""

from __future__ import annotations

from typing import NamedTuple, Sequence

from detectron2.config import CfgNode
from detectron2.modeling import Backbone, build_backbone


class BackboneLevels(NamedTuple):
    backbone: Backbone
    in_features: list[str]
    strides: list[int]
    channels: int  # the same on every level: one head is shared by them


def build_backbone_levels(cfg: CfgNode, in_features: Sequence[str], key: str) -> BackboneLevels:
    """``build_backbone(cfg)`` and the strides / channel count of ``in_features``
    (``MODEL.<key>.IN_FEATURES``), refusing names the backbone lacks or unequal channels."""
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(
            f"MODEL.{key}.IN_FEATURES {missing} are not outputs of the backbone ({sorted(shapes)})"
        )
    channels = {int(shapes[f].channels) for f in in_features}
    if len(channels) != 1:
        raise ValueError(
            f"the MODEL.{key} head is shared by its levels and needs the same channel count on "
            f"{list(in_features)}, got {sorted(channels)}"
        )
    strides = [int(shapes[f].stride) for f in in_features]
    return BackboneLevels(backbone, list(in_features), strides, channels.pop())
