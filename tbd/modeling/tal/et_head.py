"""PP-YOLOE's ET-head as a Detectron2 meta-architecture (``MODEL.META_ARCHITECTURE: "ETHeadDetector"``).

ET-head = T-Head with ESE channel attention (1x1 conv + sigmoid on the GAP) in place of the layer
attention, a shortcut on the class branch, no probability map and no offsets. Classification:
Varifocal loss; regression: each side as a distribution over ``REG_MAX + 1`` bins (in strides),
trained with Distribution Focal Loss plus GIoU; assignment: TAL (optionally ATSS warm-up).

Probe surface: ``model.head(features)`` returns :class:`ETHeadOutput` (per-level lists):
``cls_logits[l] [N, C, H, W]`` (the score is their sigmoid), ``box_ltrb[l] [N, 4, H, W]``
distances in pixels (the expectation of each side's distribution x stride), ``reg_bins[l]
[N, 4 * (REG_MAX + 1), H, W]`` the bin logits. ``model.strides``, ``model.points(features)`` and
``model.decode(points, ltrb)`` as for TOOD.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn

from tbd.modeling.dense import conv_stack
from tbd.modeling.tal.assigner import reduced_normalizer, scatter_class_targets
from tbd.modeling.tal.detector import TALDetector, TALStep, flatten_levels
from tbd.ops.boxes import giou_loss, ltrb_encode
from tbd.ops.losses import distribution_focal_loss, varifocal_loss


class ETHeadOutput(NamedTuple):
    cls_logits: list[Tensor]
    box_ltrb: list[Tensor]
    reg_bins: list[Tensor]


class ESEAttention(nn.Module):
    """Effective squeeze-excitation: ``conv1x1_norm_act(x * sigmoid(fc(GAP(x))))``."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)
        self.conv = Conv2d(
            channels, channels, 1, bias=not norm, norm=get_norm(norm, channels), activation=F.silu
        )
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.zeros_(self.fc.bias)
        nn.init.normal_(self.conv.weight, std=0.01)

    def forward(self, x: Tensor, pooled: Tensor) -> Tensor:
        return self.conv(x * torch.sigmoid(self.fc(pooled)))


def distribution_expectation(bin_logits: Tensor) -> Tensor:
    """``[..., R + 1]`` bin logits -> expected bin position ``[...]`` (in bin units)."""
    reg_max = bin_logits.shape[-1] - 1
    proj = torch.arange(reg_max + 1, device=bin_logits.device, dtype=bin_logits.dtype)
    return (bin_logits.softmax(-1) * proj).sum(-1)


class ETHead(nn.Module):
    """Shared across levels: stacked convs, then ESE stems per task (class stem with a shortcut)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: Sequence[int],
        feat_channels: int = 256,
        stacked_convs: int = 2,
        reg_max: int = 16,
        norm: str = "GN",
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.strides = list(strides)
        self.reg_max = reg_max
        self.stem = nn.Sequential(*conv_stack(in_channels, feat_channels, stacked_convs, norm, F.silu))
        channels = feat_channels if stacked_convs > 0 else in_channels
        self.cls_ese = ESEAttention(channels, norm)
        self.reg_ese = ESEAttention(channels, norm)
        self.cls_pred = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.reg_pred = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        for conv in self.stem:
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.normal_(self.cls_pred.weight, std=0.01)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.reg_pred.weight)
        nn.init.constant_(self.reg_pred.bias, 1.0)  # uniform bins: each side starts at reg_max / 2

    def forward(self, features: Sequence[Tensor]) -> ETHeadOutput:
        cls_logits, box_ltrb, reg_bins = [], [], []
        for level, feat in enumerate(features):
            x = self.stem(feat)
            pooled = F.adaptive_avg_pool2d(x, 1)
            logits = self.cls_pred(self.cls_ese(x, pooled) + x)  # class-branch shortcut
            bins = self.reg_pred(self.reg_ese(x, pooled))  # [N, 4*(R+1), H, W]
            n, _, h, w = bins.shape
            side = distribution_expectation(bins.view(n, 4, self.reg_max + 1, h, w).movedim(2, -1))
            cls_logits.append(logits)
            reg_bins.append(bins)
            box_ltrb.append(side * self.strides[level])  # [N, 4, H, W] pixels
        return ETHeadOutput(cls_logits, box_ltrb, reg_bins)


@META_ARCH_REGISTRY.register()
class ETHeadDetector(TALDetector):
    """Anchor-free detector with the ET-head: TAL + Varifocal + DFL + GIoU."""

    section, head_cls, head_args = "ETHEAD", ETHead, ("feat_channels", "stacked_convs", "reg_max")

    def __init__(self, cfg: CN) -> None:
        super().__init__(**self.from_config(cfg))
        ec = cfg.MODEL.ETHEAD
        if ec.VFL_TARGET not in ("iou", "t_hat"):
            raise ValueError(f"MODEL.ETHEAD.VFL_TARGET must be 'iou' or 't_hat', got {ec.VFL_TARGET!r}")
        self.reg_max = ec.REG_MAX
        self.vfl_alpha = ec.VFL_ALPHA
        self.vfl_gamma = ec.VFL_GAMMA
        self.vfl_target = ec.VFL_TARGET
        self.cls_loss_weight = ec.CLS_LOSS_WEIGHT
        self.giou_loss_weight = ec.GIOU_LOSS_WEIGHT
        self.dfl_loss_weight = ec.DFL_LOSS_WEIGHT

    def step_losses(self, step: TALStep) -> dict[str, Tensor]:
        flat, predictions, points, pred_boxes, assignment = step
        quality = assignment.ious if self.vfl_target == "iou" else assignment.scores
        targets = scatter_class_targets(assignment.labels, quality, self.num_classes).to(
            flat.cls_logits.dtype
        )
        normalizer = reduced_normalizer(assignment.scores.sum())
        loss_cls = varifocal_loss(flat.cls_logits, targets, self.vfl_alpha, self.vfl_gamma).sum() / normalizer

        fg = assignment.fg_mask
        weights = assignment.scores[fg]
        loss_giou = (giou_loss(pred_boxes[fg], assignment.boxes[fg]) * weights).sum() / normalizer

        bins = flatten_levels(predictions.reg_bins, 4 * (self.reg_max + 1))[fg].view(-1, 4, self.reg_max + 1)
        strides = torch.cat([points.new_full((n,), float(s)) for n, s in zip(flat.level_sizes, self.strides)])
        b = fg.shape[0]
        fg_strides = strides[None].expand(b, -1)[fg]
        fg_points = points[None].expand(b, -1, -1)[fg]
        side_targets = ltrb_encode(fg_points, assignment.boxes[fg]) / fg_strides[:, None]
        dfl = distribution_focal_loss(bins, side_targets.clamp(min=0, max=self.reg_max - 0.01)).mean(-1)
        loss_dfl = (dfl * weights).sum() / normalizer
        return {
            "loss_cls": self.cls_loss_weight * loss_cls,
            "loss_box_giou": self.giou_loss_weight * loss_giou,
            "loss_box_dfl": self.dfl_loss_weight * loss_dfl,
        }
