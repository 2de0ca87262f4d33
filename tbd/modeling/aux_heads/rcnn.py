"""The ``rcnn`` auxiliary head: Detectron2's RPN and Fast R-CNN RoI box head (``StandardROIHeads``
with ``FastRCNNConvFCHead``, RoIAlignV2 pooling) on the student's pyramid, as Co-DETR's second
auxiliary head.

Both keep their own assignment (RPN: anchors by IoU 0.7 / 0.3, 256 sampled per image; RoI head:
proposals plus the GT boxes by IoU 0.5, 512 sampled per image, a quarter positive). They are built
from Detectron2's own default config plus ``MODEL.AUX_HEADS.RCNN.*`` only, so a dense student's
unrelated ``MODEL.RPN`` / ``MODEL.ROI_HEADS`` values do not leak in. Anchors are
``ANCHOR_SCALE x stride`` per level (Faster R-CNN's 32..512 on P2-P6).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor

from tbd.modeling.aux_heads.base import AuxHead, AuxOutput, AuxPositives, cell_locations
from tbd.ops.boxes import box_centers


def level_names(strides: Sequence[int]) -> list[str]:
    return [f"aux_s{int(s)}" for s in strides]


def rcnn_sub_config(cfg: CN, strides: Sequence[int], num_classes: int) -> CN:
    """Detectron2's default config with the RPN / RoI keys of ``MODEL.AUX_HEADS.RCNN`` applied."""
    from detectron2.config import get_cfg

    levels = [math.log2(s) for s in strides]
    if any(lv != int(lv) for lv in levels) or [int(b - a) for a, b in zip(levels, levels[1:])] != [1] * (
        len(levels) - 1
    ):
        raise ValueError(
            f"the rcnn auxiliary head needs pyramid strides that are consecutive powers of 2, got {list(strides)}"
        )
    r = cfg.MODEL.AUX_HEADS.RCNN
    names = level_names(strides)
    sub = get_cfg()
    sub.MODEL.ANCHOR_GENERATOR.SIZES = [[float(r.ANCHOR_SCALE) * s] for s in strides]
    sub.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[float(x) for x in r.ASPECT_RATIOS]]
    sub.MODEL.RPN.IN_FEATURES = names
    sub.MODEL.RPN.BATCH_SIZE_PER_IMAGE = r.RPN_BATCH_SIZE_PER_IMAGE
    sub.MODEL.RPN.PRE_NMS_TOPK_TRAIN = r.RPN_PRE_NMS_TOPK_TRAIN
    sub.MODEL.RPN.POST_NMS_TOPK_TRAIN = r.RPN_POST_NMS_TOPK_TRAIN
    sub.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    sub.MODEL.ROI_HEADS.IN_FEATURES = names
    sub.MODEL.ROI_HEADS.NUM_CLASSES = int(num_classes)
    sub.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = r.BATCH_SIZE_PER_IMAGE
    sub.MODEL.ROI_HEADS.POSITIVE_FRACTION = r.POSITIVE_FRACTION
    sub.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    sub.MODEL.ROI_BOX_HEAD.NUM_FC = r.NUM_FC
    sub.MODEL.ROI_BOX_HEAD.FC_DIM = r.FC_DIM
    sub.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = r.POOLER_RESOLUTION
    sub.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    sub.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = r.BBOX_REG_LOSS_TYPE
    sub.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT = r.BBOX_REG_LOSS_WEIGHT
    return sub


class RCNNAuxHead(AuxHead):
    name = "rcnn"

    def __init__(
        self, cfg: CN, in_channels: int, strides: Sequence[int], num_classes: int, weight: float = 2.0
    ):
        super().__init__(list(strides), weight)
        sub = rcnn_sub_config(cfg, self.strides, num_classes)
        self.level_names = level_names(self.strides)
        shapes = {
            n: ShapeSpec(channels=in_channels, stride=s) for n, s in zip(self.level_names, self.strides)
        }
        self.num_classes = int(num_classes)
        self.rpn = RPN(sub, shapes)
        self.roi_heads = StandardROIHeads(sub, shapes)

    def forward(
        self, features: list[Tensor], image_sizes: list[tuple[int, int]], gt_instances: list[Instances]
    ) -> AuxOutput:
        self.check_features(features)
        feats = dict(zip(self.level_names, features))
        images = ImageList(features[0], [(int(h), int(w)) for h, w in image_sizes])  # RPN reads image_sizes
        proposals, rpn_losses = self.rpn(images, feats, gt_instances)
        sampled, roi_losses = self.roi_heads(images, feats, proposals, gt_instances)
        terms = {
            "rpn_cls": rpn_losses["loss_rpn_cls"],
            "rpn_loc": rpn_losses["loss_rpn_loc"],
            "cls": roi_losses["loss_cls"],
            "box_reg": roi_losses["loss_box_reg"],
        }
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        positives = [self._positives(p, sizes) for p in sampled]
        return AuxOutput({self.loss_key(k): self.weight * v for k, v in terms.items()}, positives)

    @torch.no_grad()
    def _positives(self, sampled: Instances, sizes: list[tuple[int, int]]) -> AuxPositives:
        """The sampled foreground RoIs of one image, with the level the pooler read them from."""
        fg = (sampled.gt_classes >= 0) & (sampled.gt_classes < self.num_classes)
        boxes = sampled.proposal_boxes.tensor[fg]
        if boxes.shape[0] == 0 or not sampled.has("gt_boxes"):
            return AuxPositives.empty(boxes.device)
        pooler = self.roi_heads.box_pooler
        levels = assign_boxes_to_levels(
            [Boxes(boxes)],
            pooler.min_level,
            pooler.max_level,
            pooler.canonical_box_size,
            pooler.canonical_level,
        ).long()
        return AuxPositives(
            boxes=boxes,
            gt_boxes=sampled.gt_boxes.tensor[fg],
            gt_classes=sampled.gt_classes[fg],
            levels=levels,
            locations=cell_locations(box_centers(boxes), levels, self.strides, sizes),
        )
