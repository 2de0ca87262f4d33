"""``build_aux_heads``: the auxiliary heads ``MODEL.AUX_HEADS`` names, for one pyramid."""

from __future__ import annotations

from detectron2.config import CfgNode as CN
from torch import nn

from tbd.modeling.aux_heads.atss import ATSSAuxHead
from tbd.modeling.aux_heads.config import aux_head_weights, aux_num_classes
from tbd.modeling.aux_heads.rcnn import RCNNAuxHead


def build_atss_head(
    cfg: CN, in_channels: int, strides: list[int], num_classes: int, weight: float
) -> ATSSAuxHead:
    a = cfg.MODEL.AUX_HEADS.ATSS
    return ATSSAuxHead(
        in_channels,
        strides,
        num_classes,
        weight=weight,
        num_convs=a.NUM_CONVS,
        norm=a.NORM,
        prior_prob=a.PRIOR_PROB,
        topk=a.TOPK,
        anchor_scale=a.ANCHOR_SCALE,
        cls_loss=a.CLS_LOSS,
        focal_alpha=a.FOCAL_ALPHA,
        focal_gamma=a.FOCAL_GAMMA,
        cls_loss_weight=a.CLS_LOSS_WEIGHT,
        giou_loss_weight=a.GIOU_LOSS_WEIGHT,
        centerness=a.CENTERNESS,
        centerness_loss_weight=a.CENTERNESS_LOSS_WEIGHT,
        max_chunk_elements=a.MAX_CHUNK_ELEMENTS,
    )


def build_aux_heads(
    cfg: CN, in_channels: int, strides: list[int], num_classes: int | None = None
) -> nn.ModuleList:
    """The heads of ``MODEL.AUX_HEADS.NAMES`` (in that order) on levels of ``strides`` (finest first).

    ``num_classes``: the detector's class count; default ``MODEL.AUX_HEADS.NUM_CLASSES`` or, when
    that is 0, the class count of the config's meta-architecture.
    """
    heads = nn.ModuleList()
    named = aux_head_weights(cfg)
    if not named:
        return heads
    k = int(num_classes) if num_classes is not None else aux_num_classes(cfg)
    strides = [int(s) for s in strides]
    for name, weight in named:
        if name == "atss":
            heads.append(build_atss_head(cfg, in_channels, strides, k, weight))
        else:
            heads.append(RCNNAuxHead(cfg, in_channels, strides, k, weight))
    return heads
