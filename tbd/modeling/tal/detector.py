"""Shared meta-architecture of the TAL-trained, anchor-free heads (TOOD T-Head and ET-head).

One point per location at the centre of each cell, boxes as ``ltrb`` distances in pixels decoded
by :meth:`TALDetector.decode`, inference with Detectron2's usual post-processing (score threshold,
top-k per level, batched NMS, ``TEST.DETECTIONS_PER_IMAGE``, ``detector_postprocess``).
Subclasses build the head and turn its outputs into ``(cls logits, ltrb)`` and losses.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import batched_nms
from detectron2.modeling.meta_arch.dense_detector import DenseDetector, permute_to_N_HWA_K
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from tbd.modeling.tal.assigner import TALAssignment, TaskAlignedAssigner
from tbd.modeling.tal.atss import ATSSAssigner
from tbd.ops.boxes import feature_points, ltrb_decode, pad_boxes


class FlatPredictions(NamedTuple):
    """Per-level head outputs flattened to ``[B, A, K]`` over all levels."""

    cls_logits: Tensor  # [B, A, C] logits whose sigmoid is the score used for assignment and output
    ltrb: Tensor  # [B, A, 4] pixels
    level_sizes: list[int]


def flatten_levels(per_level: Sequence[Tensor], dim: int) -> Tensor:
    """``[N, K, H, W]`` per level -> ``[N, sum(H*W), K]`` (row-major, as ``grid_points``)."""
    return torch.cat([permute_to_N_HWA_K(x, dim) for x in per_level], dim=1)


class TALDetector(DenseDetector):
    """Base class: points, TAL (or ATSS warm-up) assignment, inference."""

    @staticmethod
    def config_kwargs(cfg: CN, head_cfg: CN) -> dict[str, Any]:
        """The keyword arguments every TAL head takes from ``MODEL.TAL`` and its own node."""
        tal = cfg.MODEL.TAL
        warmup = (
            ATSSAssigner(tal.ATSS_TOPK, tal.ATSS_ANCHOR_SCALE, tal.MAX_CHUNK_ELEMENTS)
            if tal.WARMUP_ITERS > 0
            else None
        )
        return {
            "num_classes": head_cfg.NUM_CLASSES,
            "assigner": TaskAlignedAssigner(tal.TOPK, tal.ALPHA, tal.BETA, tal.MAX_CHUNK_ELEMENTS),
            "warmup_assigner": warmup,
            "warmup_iters": tal.WARMUP_ITERS,
            "test_score_thresh": head_cfg.SCORE_THRESH_TEST,
            "test_topk_candidates": head_cfg.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": head_cfg.NMS_THRESH_TEST,
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
        assigner: TaskAlignedAssigner,
        warmup_assigner: ATSSAssigner | None,
        warmup_iters: int,
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
        self.assigner = assigner
        self.warmup_assigner = warmup_assigner
        self.warmup_iters = warmup_iters
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image

    # ---- probe surface -------------------------------------------------------------------------
    def points(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Point centres ``[H*W, 2]`` per level, in input-image pixels."""
        return feature_points(features, self.strides)

    @staticmethod
    def decode(points: Tensor, reg: Tensor) -> Tensor:
        """Boxes ``(x1, y1, x2, y2)`` from points ``[..., 2]`` and ltrb distances in pixels ``[..., 4]``."""
        return ltrb_decode(points, reg)

    def flat_predictions(self, predictions: Any) -> FlatPredictions:
        raise NotImplementedError

    # ---- training ------------------------------------------------------------------------------
    def _current_iter(self) -> int | None:
        try:
            return int(get_event_storage().iter)
        except (AssertionError, AttributeError):
            return None

    def in_warmup(self) -> bool:
        if self.warmup_assigner is None or self.warmup_iters <= 0:
            return False
        it = self._current_iter()
        return it is not None and it < self.warmup_iters

    def assign(
        self, flat: FlatPredictions, points: Tensor, pred_boxes: Tensor, gt_instances: list[Instances]
    ) -> TALAssignment:
        gt_boxes, gt_labels, gt_mask = pad_boxes(
            [x.gt_boxes.tensor for x in gt_instances], [x.gt_classes for x in gt_instances]
        )
        if self.in_warmup():
            assert self.warmup_assigner is not None
            return self.warmup_assigner(
                pred_boxes,
                points,
                flat.level_sizes,
                self.strides,
                gt_boxes,
                gt_labels,
                gt_mask,
                self.num_classes,
            )
        scores = flat.cls_logits.detach().sigmoid()
        return self.assigner(scores, pred_boxes, points, gt_boxes, gt_labels, gt_mask, self.num_classes)

    def forward_training(
        self, images: ImageList, features: list[Tensor], predictions: Any, gt_instances: list[Instances]
    ) -> dict[str, Tensor]:
        flat = self.flat_predictions(predictions)
        points = torch.cat(self.points(features), dim=0)
        pred_boxes = self.decode(points, flat.ltrb)
        assignment = self.assign(flat, points, pred_boxes.detach(), gt_instances)
        losses = self.losses(flat, predictions, points, pred_boxes, assignment)
        try:
            storage = get_event_storage()
            storage.put_scalar("tal/num_pos_per_image", assignment.fg_mask.sum().item() / len(gt_instances))
            storage.put_scalar("tal/mean_iou_pos", assignment.ious[assignment.fg_mask].mean().item())
        except AssertionError:  # no EventStorage outside a trainer
            pass
        return losses

    def losses(
        self,
        flat: FlatPredictions,
        predictions: Any,
        points: Tensor,
        pred_boxes: Tensor,
        assignment: TALAssignment,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    # ---- inference -----------------------------------------------------------------------------
    def forward_inference(
        self, images: ImageList, features: list[Tensor], predictions: Any
    ) -> list[Instances]:
        flat = self.flat_predictions(predictions)
        points = self.points(features)
        scores = flat.cls_logits.sigmoid()
        results = []
        for img_idx, image_size in enumerate(images.image_sizes):
            results.append(
                self.inference_single_image(scores[img_idx], flat.ltrb[img_idx], points, image_size)
            )
        return results

    def inference_single_image(
        self, scores: Tensor, ltrb: Tensor, points: list[Tensor], image_size: tuple[int, int]
    ) -> Instances:
        boxes_all, scores_all, classes_all = [], [], []
        start = 0
        for pts in points:  # loop over FPN levels
            end = start + pts.shape[0]
            lvl_scores = scores[start:end]
            keep = lvl_scores > self.test_score_thresh
            kept = lvl_scores[keep]
            idx = torch.nonzero(keep)
            num = min(self.test_topk_candidates, kept.numel())
            kept, order = kept.sort(descending=True)
            kept, idx = kept[:num], idx[order[:num]]
            point_idx, cls_idx = idx.unbind(dim=1)
            boxes_all.append(self.decode(pts[point_idx], ltrb[start:end][point_idx]))
            scores_all.append(kept)
            classes_all.append(cls_idx)
            start = end
        boxes = torch.cat(boxes_all)
        det_scores = torch.cat(scores_all)
        classes = torch.cat(classes_all)
        keep = batched_nms(boxes, det_scores, classes, self.test_nms_thresh)[: self.max_detections_per_image]
        result = Instances(image_size)
        result.pred_boxes = Boxes(boxes[keep])
        result.scores = det_scores[keep]
        result.pred_classes = classes[keep]
        return result
