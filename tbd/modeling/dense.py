"""What tbd's one-point-per-location heads share: the point grid, their parts built from a config
node, and inference.

- :class:`PointGrid`: a point at the centre of every cell of every level and boxes from ``ltrb``
  distances in pixels (the TAL detectors, the ATSS auxiliary head);
- :class:`PointDetector`: the detector's parts from its config node, ``MODEL.<section>``
  (:meth:`~PointDetector.from_config`: TOOD, ETHEAD, DW), and inference as Detectron2
  post-processes a dense detector (score threshold, top-k per level, batched NMS over the levels,
  ``TEST.DETECTIONS_PER_IMAGE``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import Conv2d, batched_nms, get_norm
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from tbd.modeling.backbones.levels import build_backbone_levels
from tbd.ops.boxes import feature_points, ltrb_decode


class PointGrid:
    """Points and boxes of a model or head with one point per location (needs ``self.strides``)."""

    strides: list[int]

    def points(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Point centres ``[H*W, 2]`` per level, in input-image pixels (row-major, as ``x.flatten(2)``)."""
        return feature_points(features, self.strides)

    @staticmethod
    def decode(points: Tensor, ltrb: Tensor) -> Tensor:
        """Boxes ``(x1, y1, x2, y2)`` from points ``[..., 2]`` and ltrb distances in pixels ``[..., 4]``."""
        return ltrb_decode(points, ltrb)


def conv_stack(
    in_channels: int, channels: int, num_convs: int, norm: str, activation: Callable[[Tensor], Tensor]
) -> list[Conv2d]:
    """``num_convs`` 3x3 conv + norm + activation layers (the first from ``in_channels``), initialised
    by the caller."""
    return [
        Conv2d(
            in_channels if i == 0 else channels,
            channels,
            3,
            padding=1,
            bias=not norm,
            norm=get_norm(norm, channels),
            activation=activation,
        )
        for i in range(num_convs)
    ]


class PointDetector(DenseDetector):
    """A Detectron2 dense detector with one point per location: its parts, strides and inference.

    A subclass names its config node (``section``: ``MODEL.<section>``) and head class; the head
    gets the levels' channels and strides, the node's ``NUM_CLASSES``, ``NORM`` and ``PRIOR_PROB``
    and its own :attr:`head_args`.
    """

    section: str
    head_cls: type[nn.Module]
    #: the head's own keyword arguments, each the value of the node's key of that name in capitals
    head_args: tuple[str, ...] = ()
    decode = staticmethod(PointGrid.decode)

    @classmethod
    def head_options(cls, node: CN) -> dict[str, Any]:
        """The head's own keyword arguments from its config node (:attr:`head_args`)."""
        return {arg: node[arg.upper()] for arg in cls.head_args}

    @classmethod
    def from_config(cls, cfg: CN) -> dict[str, Any]:
        """The keyword arguments of :class:`PointDetector` (backbone and head built) from ``cfg``."""
        node = cfg.MODEL[cls.section]
        levels = build_backbone_levels(cfg, node.IN_FEATURES, cls.section)
        head = cls.head_cls(
            in_channels=levels.channels,
            num_classes=node.NUM_CLASSES,
            strides=levels.strides,
            norm=node.NORM,
            prior_prob=node.PRIOR_PROB,
            **cls.head_options(node),
        )
        return {
            "backbone": levels.backbone,
            "head": head,
            "head_in_features": levels.in_features,
            "num_classes": node.NUM_CLASSES,
            "test_score_thresh": node.SCORE_THRESH_TEST,
            "test_topk_candidates": node.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": node.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        head_in_features: list[str],
        *,
        num_classes: int,
        test_score_thresh: float,
        test_topk_candidates: int,
        test_nms_thresh: float,
        max_detections_per_image: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
    ) -> None:
        super().__init__(backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std)
        shapes = backbone.output_shape()
        self.strides: list[int] = [int(shapes[f].stride) for f in head_in_features]
        self.num_classes = num_classes
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    def inference_single_image(
        self,
        level_scores: Sequence[Tensor],
        level_ltrb: Sequence[Tensor],
        level_points: Sequence[Tensor],
        image_size: tuple[int, int],
    ) -> Instances:
        """Detections of one image from per-level scores ``[P, C]``, ltrb ``[P, 4]`` and points ``[P, 2]``.

        Per level the scores above ``test_score_thresh``, at most ``test_topk_candidates`` of them
        (the best), decoded; then batched NMS over all levels and the ``max_detections_per_image`` best.
        """
        boxes_all, scores_all, classes_all = [], [], []
        for scores, ltrb, points in zip(level_scores, level_ltrb, level_points):  # loop over FPN levels
            flat = scores.flatten()  # [P * C]
            keep = torch.nonzero(flat > self.test_score_thresh).squeeze(1)
            kept, order = flat[keep].topk(min(self.test_topk_candidates, keep.numel()))
            keep = keep[order]
            point_idx, cls_idx = keep // scores.shape[1], keep % scores.shape[1]
            boxes_all.append(self.decode(points[point_idx], ltrb[point_idx].to(points.dtype)))
            scores_all.append(kept)
            classes_all.append(cls_idx)
        boxes, scores, classes = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(classes_all)
        keep = batched_nms(boxes, scores, classes, self.test_nms_thresh)[: self.max_detections_per_image]
        return Instances(
            image_size, pred_boxes=Boxes(boxes[keep]), scores=scores[keep], pred_classes=classes[keep]
        )
