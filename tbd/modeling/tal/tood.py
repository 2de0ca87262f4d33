"""TOOD: the T-Head and its Detectron2 meta-architecture (``MODEL.META_ARCHITECTURE: "TOOD"``).

Probe surface (what distillation hooks can read)
------------------------------------------------
* ``model.head`` is a :class:`THead`; ``model.head(features)`` (features: list of FPN maps, one per
  entry of ``MODEL.TOOD.IN_FEATURES``) returns a :class:`TOODHeadOutput` named tuple of per-level
  lists, so a forward hook on ``model.head`` sees it as its output:
  - ``cls_logits[l]``  ``[N, C, H, W]`` dense class logits P, *before* the alignment with M;
  - ``box_ltrb[l]``    ``[N, 4, H, W]`` left/top/right/bottom distances in input pixels, *after*
    the offset sampling (the boxes the losses and inference use);
  - ``aligned_logits[l]`` ``[N, C, H, W]`` logit of the aligned score: ``sigmoid(aligned_logits)
    = sqrt(sigmoid(P) * sigmoid(M))`` (``output.aligned_scores()`` gives the scores themselves).
* ``model.strides`` (one per level), ``model.points(features)`` (``[H*W, 2]`` per level, row-major
  as ``x.flatten(2)``), ``model.decode(points, ltrb)`` -> ``(x1, y1, x2, y2)``, used by both the
  losses and inference.
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
from tbd.modeling.tal.assigner import task_aligned_losses
from tbd.modeling.tal.detector import TALDetector, TALStep

_MAX_LOG_DISTANCE = 10.0  # exp() input cap for the distances (in strides): ~2e4 strides


class TOODHeadOutput(NamedTuple):
    cls_logits: list[Tensor]
    box_ltrb: list[Tensor]
    aligned_logits: list[Tensor]

    def aligned_scores(self) -> list[Tensor]:
        return [x.sigmoid() for x in self.aligned_logits]


def aligned_logit(cls_logits: Tensor, prob_logits: Tensor) -> Tensor:
    """Logit of ``sqrt(sigmoid(P) * sigmoid(M))``, computed in log space (stable for large |P|, |M|)."""
    log_p = 0.5 * (F.logsigmoid(cls_logits) + F.logsigmoid(prob_logits))
    return log_p - torch.log((-torch.expm1(log_p)).clamp(min=1e-12))


def offset_sample(values: Tensor, offsets: Tensor) -> Tensor:
    """``out[n, c, i, j] = values[n, c, i + offsets[n, 2c, i, j], j + offsets[n, 2c+1, i, j]]``.

    Bilinear sampling (``grid_sample``, zeros outside the map), one 2-D offset per channel.
    """
    n, c, h, w = values.shape
    off = offsets.reshape(n, c, 2, h, w)
    rows = torch.arange(h, device=values.device, dtype=values.dtype).view(1, 1, h, 1) + off[:, :, 0]
    cols = torch.arange(w, device=values.device, dtype=values.dtype).view(1, 1, 1, w) + off[:, :, 1]
    grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], dim=-1)  # align_corners=False
    out = F.grid_sample(
        values.reshape(n * c, 1, h, w),
        grid.reshape(n * c, h, w, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return out.view(n, c, h, w)


class TaskDecomposition(nn.Module):
    """Layer attention over the N stacked features, then a 1x1 reduction (conv1 of Z = conv2(ReLU(conv1 X)))."""

    def __init__(self, feat_channels: int, stacked_convs: int, la_down_rate: int, norm: str) -> None:
        super().__init__()
        total = feat_channels * stacked_convs
        self.stacked_convs = stacked_convs
        self.fc1 = nn.Conv2d(total, max(1, total // la_down_rate), 1)
        self.fc2 = nn.Conv2d(max(1, total // la_down_rate), stacked_convs, 1)
        self.reduction = Conv2d(total, feat_channels, 1, bias=not norm, norm=get_norm(norm, feat_channels))
        for m in (self.fc1, self.fc2):
            nn.init.normal_(m.weight, std=0.001)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.reduction.weight, std=0.01)

    def forward(self, stacked: Tensor, pooled: Tensor) -> Tensor:
        n, _, h, w = stacked.shape
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))  # [N, S, 1, 1]
        scaled = stacked.view(n, self.stacked_convs, -1, h, w) * weights.view(n, self.stacked_convs, 1, 1, 1)
        return F.relu(self.reduction(scaled.view(n, -1, h, w)))


class THead(nn.Module):
    """Task-aligned head: shared across levels, one learnable distance scale per level."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: Sequence[int],
        feat_channels: int = 256,
        stacked_convs: int = 6,
        la_down_rate: int = 8,
        norm: str = "GN",
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.strides = list(strides)
        self.inter_convs = nn.ModuleList(conv_stack(in_channels, feat_channels, stacked_convs, norm, F.relu))
        total = feat_channels * stacked_convs
        self.cls_decomp = TaskDecomposition(feat_channels, stacked_convs, la_down_rate, norm)
        self.reg_decomp = TaskDecomposition(feat_channels, stacked_convs, la_down_rate, norm)
        self.cls_pred = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.reg_pred = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.prob_conv1 = nn.Conv2d(total, feat_channels // 4, 1)
        self.prob_conv2 = nn.Conv2d(feat_channels // 4, 1, 3, padding=1)
        self.offset_conv1 = nn.Conv2d(total, feat_channels // 4, 1)
        self.offset_conv2 = nn.Conv2d(feat_channels // 4, 8, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))

        bias = -math.log((1 - prior_prob) / prior_prob)
        for conv in self.inter_convs:
            nn.init.normal_(conv.weight, std=0.01)
        for m in (self.cls_pred, self.reg_pred, self.prob_conv1, self.prob_conv2, self.offset_conv1):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_pred.bias, bias)
        nn.init.constant_(self.prob_conv2.bias, bias)
        nn.init.zeros_(self.offset_conv2.weight)  # start without offsets
        nn.init.zeros_(self.offset_conv2.bias)

    def forward(self, features: Sequence[Tensor]) -> TOODHeadOutput:
        cls_logits, box_ltrb, aligned = [], [], []
        for level, x in enumerate(features):
            layers = []
            for conv in self.inter_convs:
                x = conv(x)
                layers.append(x)
            stacked = torch.cat(layers, dim=1)  # X_inter: the N task-interactive features
            pooled = F.adaptive_avg_pool2d(stacked, 1)
            cls_feat = self.cls_decomp(stacked, pooled)
            reg_feat = self.reg_decomp(stacked, pooled)

            logits = self.cls_pred(cls_feat)  # P
            prob = self.prob_conv2(F.relu(self.prob_conv1(stacked)))  # M (logit)
            dist = torch.exp((self.scales[level] * self.reg_pred(reg_feat)).clamp(max=_MAX_LOG_DISTANCE))
            offsets = self.offset_conv2(F.relu(self.offset_conv1(stacked)))  # O
            cls_logits.append(logits)
            aligned.append(aligned_logit(logits, prob))
            box_ltrb.append(offset_sample(dist, offsets) * self.strides[level])
        return TOODHeadOutput(cls_logits, box_ltrb, aligned)


@META_ARCH_REGISTRY.register()
class TOOD(TALDetector):
    """TOOD detector: T-Head trained with TAL (quality focal loss + t_hat-weighted GIoU)."""

    section, head_cls, head_args = "TOOD", THead, ("feat_channels", "stacked_convs", "la_down_rate")
    score_field = "aligned_logits"  # sigmoid = sqrt(sigmoid(P) * sigmoid(M))

    def __init__(self, cfg: CN) -> None:
        super().__init__(**self.from_config(cfg))
        tc = cfg.MODEL.TOOD
        self.focal_gamma = tc.FOCAL_GAMMA
        self.cls_loss_weight = tc.CLS_LOSS_WEIGHT
        self.box_loss_weight = tc.BOX_LOSS_WEIGHT

    def step_losses(self, step: TALStep) -> dict[str, Tensor]:
        loss_cls, loss_box, _ = task_aligned_losses(
            step.flat.cls_logits, step.pred_boxes, step.assignment, self.num_classes, gamma=self.focal_gamma
        )
        return {"loss_cls": self.cls_loss_weight * loss_cls, "loss_box_giou": self.box_loss_weight * loss_box}
