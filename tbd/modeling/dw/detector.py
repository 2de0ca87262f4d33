"""DW: an FCOS-style dense detector trained with dual weighting (CVPR 2022), with box refinement.

``MODEL.META_ARCHITECTURE: "DWDetector"``; hyper-parameters under ``MODEL.DW.*`` (see
:func:`add_dw_config` and docs/HEADS.md). Spec: METHODS.md §3.

Probe surface (what distillation probes may rely on):

- ``model.head`` (:class:`~tbd.modeling.dw.head.DWHead`): ``forward(features)`` takes the FPN maps
  in ``model.head_in_features`` order (strides ``model.strides``) and returns three per-level
  lists: class logits ``[N, C, H, W]`` (raw, before any sigmoid), box regression as ``ltrb`` side
  distances in pixels ``[N, 4, H, W]`` (after refinement when ``MODEL.DW.BOX_REFINEMENT``), and
  centerness/objectness logits ``[N, 1, H, W]``. The score used for ranking is
  ``sigmoid(cls) * sigmoid(ctr)``. With refinement on, a forward hook on ``model.head.refine``
  sees the coarse distances as its second input.
- ``model.strides``: the stride of each level (one point per location, no anchors).
- ``model.points(sizes)``: the location centres ``[H*W, 2]`` (x, y) per level, row-major (same
  order as ``x.flatten(2)``), at ``(j + 0.5, i + 0.5) * stride``.
- ``model.decode(points, reg)``: boxes ``(x1, y1, x2, y2)`` from points ``[..., P, 2]`` and ``ltrb``
  ``[..., P, 4]``; used by the loss and by inference.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor

from tbd.modeling.dense import PointDetector
from tbd.modeling.dw.head import DWHead
from tbd.modeling.dw.loss import DWLoss, DWLossConfig
from tbd.ops.boxes import grid_points, pad_boxes


def add_dw_config(cfg: CN) -> None:
    """Add ``MODEL.DW.*``. Defaults follow the reference DW code (FCOS R-50, COCO)."""
    cfg.MODEL.DW = CN()
    cfg.MODEL.DW.NUM_CLASSES = 80
    cfg.MODEL.DW.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # head: NUM_CONVS conv+norm+ReLU per branch, shared over levels
    cfg.MODEL.DW.NUM_CONVS = 4
    cfg.MODEL.DW.NORM = "GN"
    cfg.MODEL.DW.PRIOR_PROB = 0.02  # initial class probability (bias of the class conv)
    cfg.MODEL.DW.REG_BIAS_INIT = 4.0  # initial ltrb = 4 strides
    # box refinement: boundary point per side + bilinear re-reading of the side
    cfg.MODEL.DW.BOX_REFINEMENT = True
    # candidates: points inside the GT, weighted by a Gaussian centre prior (distance in strides)
    cfg.MODEL.DW.PRIOR_SIGMA = 1.11
    # positive weight: p_loc = exp(-LOC_EXPONENT * L_GIoU), p_pos = p_cls * p_loc,
    # w_pos = exp(POS_MU p) p prior / sum_candidates exp(POS_MU_NORM p) p prior
    cfg.MODEL.DW.LOC_EXPONENT = 5.0
    cfg.MODEL.DW.POS_MU = 5.0
    cfg.MODEL.DW.POS_MU_NORM = 3.0
    # negative weight: P_neg(IoU) (1 below NEG_IOU_LOW, then (x^p - 1)/(low^p - 1) min-max
    # normalised per GT, p = NEG_POWER) times I_neg = s^NEG_GAMMA
    cfg.MODEL.DW.NEG_IOU_LOW = 0.5
    cfg.MODEL.DW.NEG_POWER = 2.0
    cfg.MODEL.DW.NEG_GAMMA = 2.0
    # loss weights (the reference: 0.25 positive classification, 0.25 * 5 GIoU, 1 negative)
    cfg.MODEL.DW.CLS_POS_WEIGHT = 0.25
    cfg.MODEL.DW.LOC_WEIGHT = 1.25
    cfg.MODEL.DW.CLS_NEG_WEIGHT = 1.0
    # inference (score = sigmoid(cls) * sigmoid(ctr))
    cfg.MODEL.DW.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.DW.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.DW.NMS_THRESH_TEST = 0.6


def loss_config_from(cfg: CN) -> DWLossConfig:
    d = cfg.MODEL.DW
    return DWLossConfig(
        num_classes=d.NUM_CLASSES,
        prior_sigma=d.PRIOR_SIGMA,
        loc_exponent=d.LOC_EXPONENT,
        pos_mu=d.POS_MU,
        pos_mu_norm=d.POS_MU_NORM,
        neg_iou_low=d.NEG_IOU_LOW,
        neg_power=d.NEG_POWER,
        neg_gamma=d.NEG_GAMMA,
        cls_pos_weight=d.CLS_POS_WEIGHT,
        loc_weight=d.LOC_WEIGHT,
        cls_neg_weight=d.CLS_NEG_WEIGHT,
    )


@META_ARCH_REGISTRY.register()
class DWDetector(PointDetector):
    """FCOS-style detector (one point per location) with the DW loss; see the module docstring.

    Parts, points and inference (scores ``sigmoid(cls) * sigmoid(centerness)``) as every
    :class:`~tbd.modeling.dense.PointDetector`; training with :class:`~tbd.modeling.dw.loss.DWLoss`.
    """

    section, head_cls, head_args = "DW", DWHead, ("num_convs", "reg_bias_init", "box_refinement")

    def __init__(self, cfg: CN) -> None:
        super().__init__(**self.from_config(cfg))
        self.input_format = cfg.INPUT.FORMAT
        self.criterion = DWLoss(loss_config_from(cfg))

    # ---- probe surface -------------------------------------------------------------------
    def points(self, sizes: Sequence[Tuple[int, int]]) -> List[Tensor]:
        """Location centres ``[H*W, 2]`` of each level, for maps of the given ``(H, W)``."""
        return grid_points(sizes, self.strides, device=self.device)

    # ---- training ------------------------------------------------------------------------
    def _flatten(self, predictions: List[List[Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
        logits, ltrb, ctr = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
        return torch.cat(logits, dim=1), torch.cat(ltrb, dim=1), torch.cat(ctr, dim=1).squeeze(-1)

    def forward_training(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List[List[Tensor]],
        gt_instances: List[Instances],
    ) -> Dict[str, Tensor]:
        logits, ltrb, ctr = self._flatten(predictions)
        sizes = [tuple(f.shape[-2:]) for f in features]
        level_points = self.points(sizes)
        points = torch.cat(level_points, dim=0)
        point_strides = torch.cat(
            [
                torch.full((len(p),), float(s), device=points.device)
                for p, s in zip(level_points, self.strides)
            ]
        )
        gt_boxes, gt_labels, gt_mask = pad_boxes(
            [x.gt_boxes.tensor.to(points.dtype) for x in gt_instances], [x.gt_classes for x in gt_instances]
        )
        losses = self.criterion(
            logits, ltrb.float(), ctr, points, point_strides, gt_boxes, gt_labels, gt_mask
        )
        self._put_scalars(self.criterion.last_stats)
        return losses

    @staticmethod
    def _put_scalars(stats: Dict[str, float]) -> None:
        try:
            storage = get_event_storage()
        except AssertionError:  # no EventStorage outside a trainer
            return
        for name, value in stats.items():
            storage.put_scalar(f"dw/{name}", value)

    # ---- inference -----------------------------------------------------------------------
    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ) -> List[Instances]:
        logits, ltrb, ctr = self._transpose_dense_predictions(predictions, [self.num_classes, 4, 1])
        level_points = self.points([tuple(f.shape[-2:]) for f in features])
        return [
            self.inference_single_image(
                [lg[i].sigmoid() * ct[i].sigmoid() for lg, ct in zip(logits, ctr)],  # [HW, C] per level
                [bx[i] for bx in ltrb],
                level_points,
                image_size,
            )
            for i, image_size in enumerate(images.image_sizes)
        ]
