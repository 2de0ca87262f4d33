"""The inference every one-point-per-location detector shares (``tbd.modeling.dense.PointDetector``),
on hand-worked scores: threshold, top-k per level, class of each candidate, NMS over the levels."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tbd.modeling.dense import PointDetector, PointGrid


def _settings(score_thresh: float, topk: int, max_detections: int) -> SimpleNamespace:
    """What ``inference_single_image`` reads of a detector (NMS at IoU 0.5)."""
    return SimpleNamespace(
        test_score_thresh=score_thresh,
        test_topk_candidates=topk,
        test_nms_thresh=0.5,
        max_detections_per_image=max_detections,
        decode=PointGrid.decode,
    )


def test_threshold_topk_per_level_and_nms_across_levels() -> None:
    model = _settings(score_thresh=0.3, topk=2, max_detections=3)
    # level 0: three points, three classes. Above 0.3: (p0, c0) 0.9, (p1, c2) 0.8, (p2, c1) 0.5,
    # (p2, c0) 0.35; the top 2 are kept: 0.9 and 0.8
    scores0 = torch.tensor([[0.9, 0.1, 0.1], [0.2, 0.1, 0.8], [0.35, 0.5, 0.1]])
    points0 = torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]])
    # level 1: one point with the same box as (p0, c0) and a lower score: removed by NMS
    scores1 = torch.tensor([[0.6, 0.05, 0.0]])
    points1 = torch.tensor([[4.0, 4.0]])
    ltrb = [torch.full((3, 4), 2.0), torch.full((1, 4), 2.0)]
    inst = PointDetector.inference_single_image(model, [scores0, scores1], ltrb, [points0, points1], (32, 32))
    assert inst.image_size == (32, 32)
    assert inst.scores.tolist() == [0.8999999761581421, 0.800000011920929]
    assert inst.pred_classes.tolist() == [0, 2]
    assert inst.pred_boxes.tensor.tolist() == [[2.0, 2.0, 6.0, 6.0], [10.0, 2.0, 14.0, 6.0]]

    model.max_detections_per_image = 1  # the best one only
    inst = PointDetector.inference_single_image(model, [scores0, scores1], ltrb, [points0, points1], (32, 32))
    assert inst.pred_classes.tolist() == [0] and len(inst) == 1


def test_no_score_above_the_threshold_gives_no_detection() -> None:
    model = _settings(score_thresh=0.95, topk=10, max_detections=5)
    inst = PointDetector.inference_single_image(
        model, [torch.rand(4, 3) * 0.9], [torch.ones(4, 4)], [torch.zeros(4, 2)], (8, 8)
    )
    assert len(inst) == 0 and inst.pred_boxes.tensor.shape == (0, 4)
