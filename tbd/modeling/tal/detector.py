"""Shared meta-architecture of the TAL-trained, anchor-free heads (TOOD T-Head and ET-head).

One point per location at the centre of each cell, boxes as ``ltrb`` distances in pixels decoded
by :meth:`TALDetector.decode` (:class:`tbd.modeling.dense.PointGrid`), inference with Detectron2's
usual post-processing (:class:`tbd.modeling.dense.PointDetector`: score threshold, top-k per level,
batched NMS, ``TEST.DETECTIONS_PER_IMAGE``, ``detector_postprocess``).
Subclasses build the head and turn its outputs into ``(cls logits, ltrb)`` and losses.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from tbd.modeling.dense import PointDetector, PointGrid
from tbd.modeling.tal.assigner import TALAssignment, TaskAlignedAssigner
from tbd.modeling.tal.atss import ATSSAssigner
from tbd.ops.boxes import pad_boxes


class FlatPredictions(NamedTuple):
    """Per-level head outputs flattened to ``[B, A, K]`` over all levels."""

    cls_logits: Tensor  # [B, A, C] logits whose sigmoid is the score used for assignment and output
    ltrb: Tensor  # [B, A, 4] pixels
    level_sizes: list[int]


class TALStep(NamedTuple):
    """The arguments of :meth:`TALDetector.losses`, as :meth:`TALDetector.step_losses` takes them."""

    flat: FlatPredictions
    predictions: Any  # the head's output
    points: Tensor  # [A, 2] over all levels
    pred_boxes: Tensor  # [B, A, 4] decoded, with gradient
    assignment: TALAssignment


def flatten_levels(per_level: Sequence[Tensor], dim: int) -> Tensor:
    """``[N, K, H, W]`` per level -> ``[N, sum(H*W), K]`` (row-major, as ``grid_points``)."""
    return torch.cat([permute_to_N_HWA_K(x, dim) for x in per_level], dim=1)


class TALDetector(PointGrid, PointDetector):
    """Base class: points, TAL (or ATSS warm-up) assignment, inference (:class:`PointDetector`)."""

    #: the field of the head's output whose sigmoid is the score (assignment and detections)
    score_field = "cls_logits"

    @classmethod
    def from_config(cls, cfg: CN) -> dict[str, Any]:
        """:meth:`PointDetector.from_config` and the assigners of ``MODEL.TAL``."""
        tal = cfg.MODEL.TAL
        warmup = (
            ATSSAssigner(tal.ATSS_TOPK, tal.ATSS_ANCHOR_SCALE, tal.MAX_CHUNK_ELEMENTS)
            if tal.WARMUP_ITERS > 0
            else None
        )
        return {
            **super().from_config(cfg),
            "assigner": TaskAlignedAssigner(tal.TOPK, tal.ALPHA, tal.BETA, tal.MAX_CHUNK_ELEMENTS),
            "warmup_assigner": warmup,
            "warmup_iters": tal.WARMUP_ITERS,
        }

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        head_in_features: list[str],
        *,
        assigner: TaskAlignedAssigner,
        warmup_assigner: ATSSAssigner | None,
        warmup_iters: int,
        **inference: Any,
    ) -> None:
        super().__init__(backbone, head, head_in_features, **inference)
        self.assigner = assigner
        self.warmup_assigner = warmup_assigner
        self.warmup_iters = warmup_iters

    def flat_predictions(self, predictions: Any) -> FlatPredictions:
        """The head's score logits (:attr:`score_field`) and ltrb distances over all levels."""
        return FlatPredictions(
            cls_logits=flatten_levels(getattr(predictions, self.score_field), self.num_classes),
            ltrb=flatten_levels(predictions.box_ltrb, 4),
            level_sizes=[int(x.shape[-2] * x.shape[-1]) for x in predictions.box_ltrb],
        )

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
        """The head's losses of one training step: its flat predictions, the head's output, the points
        ``[A, 2]`` over all levels, the decoded boxes ``[B, A, 4]`` (with gradient) and the assignment."""
        return self.step_losses(TALStep(flat, predictions, points, pred_boxes, assignment))

    def step_losses(self, step: TALStep) -> dict[str, Tensor]:
        """:meth:`losses` of a subclass, its arguments in one :class:`TALStep`."""
        raise NotImplementedError

    # ---- inference -----------------------------------------------------------------------------
    def forward_inference(
        self, images: ImageList, features: list[Tensor], predictions: Any
    ) -> list[Instances]:
        flat = self.flat_predictions(predictions)
        points = self.points(features)
        scores = flat.cls_logits.sigmoid()
        return [
            self.inference_single_image(s.split(flat.level_sizes), ltrb.split(flat.level_sizes), points, size)
            for s, ltrb, size in zip(scores, flat.ltrb, images.image_sizes)
        ]
