"""The ``atss`` auxiliary head: ATSS assignment (one square prior per location), focal or quality
focal classification, GIoU and centerness, as Co-DETR's first auxiliary head.

Assignment is tbd's vectorised :class:`~tbd.modeling.tal.atss.ATSSAssigner` (the TAL warm-up's):
per level and GT the ``TOPK`` locations nearest to the GT centre are candidates; those whose prior
box (side ``ANCHOR_SCALE x stride``) has an IoU of at least mean + std of the GT's candidate IoUs
and whose centre lies inside the GT are positives; a location claimed twice goes to the highest
prior IoU. Boxes are ``ltrb`` distances relative to half the prior's side, so the untrained head
predicts the prior itself.

Probe surface (a dense teacher read through this head, part 3 of issue 17): :meth:`predict` gives
per-level class logits ``(B, K, H, W)`` (one prior per location) and ltrb distances ``(B, 4, H, W)``
in pixels; :meth:`points` and :meth:`decode` turn them into boxes per location.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from tbd.modeling.aux_heads.base import AuxHead, AuxOutput, AuxPositives
from tbd.modeling.dense import PointGrid
from tbd.modeling.tal.assigner import reduced_normalizer, scatter_class_targets
from tbd.modeling.tal.atss import ATSSAssigner
from tbd.ops.boxes import giou_loss, ltrb_encode, pad_boxes
from tbd.ops.losses import quality_focal_loss, sigmoid_focal_loss

_MAX_LOG_SCALE = 8.0  # exp() input cap of the box branch (in half prior sides)
CLS_LOSSES = ("focal", "qfl")


class ATSSPrediction(NamedTuple):
    cls_logits: list[Tensor]  # (B, K, H, W) per level
    box_ltrb: list[Tensor]  # (B, 4, H, W) per level, pixels
    centerness: list[Tensor] | None  # (B, 1, H, W) logits per level, None without the branch


def centerness_target(ltrb: Tensor) -> Tensor:
    """FCOS/ATSS centerness ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of ``[..., 4]``."""
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    ratio = (lr.min(-1).values / lr.max(-1).values.clamp(min=1e-6)) * (
        tb.min(-1).values / tb.max(-1).values.clamp(min=1e-6)
    )
    return ratio.clamp(min=0).sqrt()


def _tower(in_channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers = []
    for _ in range(num_convs):
        conv = Conv2d(
            in_channels,
            in_channels,
            3,
            padding=1,
            bias=not norm,
            norm=get_norm(norm, in_channels),
            activation=F.relu,
        )
        nn.init.normal_(conv.weight, std=0.01)
        layers.append(conv)
    return nn.Sequential(*layers)


class ATSSAuxHead(PointGrid, AuxHead):
    """ATSS-assigned auxiliary head; :meth:`points` and :meth:`decode` from :class:`PointGrid`."""

    name = "atss"

    def __init__(
        self,
        in_channels: int,
        strides: Sequence[int],
        num_classes: int,
        *,
        weight: float = 2.0,
        num_convs: int = 1,
        norm: str = "GN",
        prior_prob: float = 0.01,
        topk: int = 9,
        anchor_scale: float = 8.0,
        cls_loss: str = "focal",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        cls_loss_weight: float = 1.0,
        giou_loss_weight: float = 2.0,
        centerness: bool = True,
        centerness_loss_weight: float = 1.0,
        max_chunk_elements: int = 2**22,
    ) -> None:
        super().__init__(list(strides), weight)
        if cls_loss not in CLS_LOSSES:
            raise ValueError(
                f"MODEL.AUX_HEADS.ATSS.CLS_LOSS {cls_loss!r} is unknown; choose among {list(CLS_LOSSES)}"
            )
        self.num_classes = int(num_classes)
        self.anchor_scale = float(anchor_scale)
        self.cls_loss = cls_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.cls_loss_weight = cls_loss_weight
        self.giou_loss_weight = giou_loss_weight
        self.centerness_loss_weight = centerness_loss_weight
        self.assigner = ATSSAssigner(topk, anchor_scale, max_chunk_elements)

        self.cls_tower = _tower(in_channels, num_convs, norm)
        self.box_tower = _tower(in_channels, num_convs, norm)
        self.cls_pred = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctr_pred = nn.Conv2d(in_channels, 1, 3, padding=1) if centerness else None
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        for m in (self.cls_pred, self.box_pred, self.ctr_pred):
            if m is not None:
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    # ---- dense predictions (also the probe surface) --------------------------------------------
    def forward_levels(self, features: Sequence[Tensor]) -> ATSSPrediction:
        self.check_features(list(features))
        cls_logits, box_ltrb, ctr = [], [], []
        for level, x in enumerate(features):
            c = self.cls_tower(x)
            b = self.box_tower(x)
            cls_logits.append(self.cls_pred(c))
            half = 0.5 * self.anchor_scale * self.strides[level]
            box_ltrb.append(
                torch.exp((self.scales[level] * self.box_pred(b)).clamp(max=_MAX_LOG_SCALE)) * half
            )
            if self.ctr_pred is not None:
                ctr.append(self.ctr_pred(b))
        return ATSSPrediction(cls_logits, box_ltrb, ctr if self.ctr_pred is not None else None)

    def predict(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: class logits ``(B, K, H, W)`` and ltrb distances ``(B, 4, H, W)`` in pixels."""
        out = self.forward_levels(features)
        return out.cls_logits, out.box_ltrb

    def boxes_per_location(self, features: Sequence[Tensor], box_ltrb: Sequence[Tensor]) -> list[Tensor]:
        """Decoded boxes ``(B, H*W, 4)`` per level, for the ltrb maps :meth:`predict` returned."""
        return [self.decode(p, r.flatten(2).transpose(1, 2)) for p, r in zip(self.points(features), box_ltrb)]

    # ---- training --------------------------------------------------------------------------------
    def forward(
        self, features: list[Tensor], image_sizes: list[tuple[int, int]], gt_instances: list[Instances]
    ) -> AuxOutput:
        pred = self.forward_levels(features)
        level_sizes = [int(x.shape[-2] * x.shape[-1]) for x in pred.cls_logits]
        cls = torch.cat([x.flatten(2).transpose(1, 2) for x in pred.cls_logits], dim=1)  # [B, A, K]
        ltrb = torch.cat([x.flatten(2).transpose(1, 2) for x in pred.box_ltrb], dim=1)  # [B, A, 4]
        points = torch.cat(self.points(features), dim=0)  # [A, 2]
        boxes = self.decode(points, ltrb)
        gt_boxes, gt_labels, gt_mask = pad_boxes(
            [x.gt_boxes.tensor for x in gt_instances], [x.gt_classes for x in gt_instances]
        )
        a = self.assigner(
            boxes.detach(), points, level_sizes, self.strides, gt_boxes, gt_labels, gt_mask, self.num_classes
        )
        fg = a.fg_mask
        bi, ai = fg.nonzero(as_tuple=True)
        num_pos = reduced_normalizer(fg.sum().to(cls.dtype))

        if self.cls_loss == "focal":
            targets = scatter_class_targets(a.labels, fg.to(cls.dtype), self.num_classes)
            loss_cls = sigmoid_focal_loss(cls, targets, self.focal_alpha, self.focal_gamma).sum()
        else:  # quality focal: the soft target of a positive is its predicted box's IoU with the GT
            targets = scatter_class_targets(a.labels, a.ious.to(cls.dtype), self.num_classes)
            loss_cls = quality_focal_loss(cls, targets, self.focal_gamma).sum()
        losses = {"cls": self.cls_loss_weight * loss_cls / num_pos}

        pos_boxes, pos_gt = boxes[bi, ai], a.boxes[bi, ai]
        giou = giou_loss(pos_boxes, pos_gt)
        if pred.centerness is not None:
            ctr_logits = torch.cat([x.flatten(2).transpose(1, 2) for x in pred.centerness], dim=1)[..., 0]
            ctr_t = centerness_target(ltrb_encode(points[ai], pos_gt))
            losses["giou"] = self.giou_loss_weight * (giou * ctr_t).sum() / reduced_normalizer(ctr_t.sum())
            bce = F.binary_cross_entropy_with_logits(ctr_logits[bi, ai], ctr_t, reduction="sum")
            losses["ctr"] = self.centerness_loss_weight * bce / num_pos
        else:
            losses["giou"] = self.giou_loss_weight * giou.sum() / num_pos
        _put_scalar("aux/atss_num_pos_per_image", fg.sum().item() / max(1, len(gt_instances)))

        priors = self.assigner.prior_boxes(points, level_sizes, self.strides)
        starts = torch.tensor([0, *level_sizes], device=points.device).cumsum(0)
        levels = torch.searchsorted(starts[1:], ai, right=True)
        positives = self._split(
            bi, len(gt_instances), priors[ai], pos_gt, a.labels[bi, ai], levels, ai - starts[levels]
        )
        return AuxOutput({self.loss_key(k): self.weight * v for k, v in losses.items()}, positives)

    @staticmethod
    def _split(image: Tensor, num_images: int, *fields: Tensor) -> list[AuxPositives]:
        counts = torch.bincount(image, minlength=num_images).tolist()
        parts = [f.detach().split(counts) for f in fields]
        return [AuxPositives(*(p[i] for p in parts)) for i in range(num_images)]


def _put_scalar(name: str, value: float) -> None:
    with contextlib.suppress(AssertionError):  # no EventStorage outside a trainer
        get_event_storage().put_scalar(name, value)
