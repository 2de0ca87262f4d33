"""DW box refinement: shapes, exact re-reading on a linear box field, IoU gain, gradients."""

from __future__ import annotations

import torch

from tbd.modeling.dw.refine import BoxRefinement, refine_ltrb
from tbd.ops.boxes import aligned_iou, grid_points, ltrb_decode

GT = (12.0, 12.0, 52.0, 44.0)
STRIDE = 8


def _linear_field(h: int = 8, w: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Every location predicts each side of GT with an error of half its distance to that side.

    The coarse box of a location is poor, but the box predicted *at* a side is exact there: the
    field of each box coordinate is linear in the location, so bilinear sampling reads it exactly.
    """
    (points,) = grid_points([(h, w)], [STRIDE])
    px, py = points[:, 0], points[:, 1]
    x1, y1, x2, y2 = GT
    boxes = torch.stack(
        [x1 + 0.5 * (px - x1), y1 + 0.5 * (py - y1), x2 - 0.5 * (x2 - px), y2 - 0.5 * (y2 - py)], dim=-1
    )
    ltrb = torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], dim=-1)  # [HW, 4]
    return points, ltrb.T.reshape(1, 4, h, w).contiguous()


def test_refined_sides_halve_the_error_and_iou_improves():
    points, ltrb = _linear_field()
    refined = refine_ltrb(ltrb, torch.zeros(1, 8, 8, 8), points, STRIDE)
    assert refined.shape == (1, 4, 8, 8)
    # locations strictly inside the GT
    flat_c = ltrb.reshape(4, -1).T
    flat_r = refined.reshape(4, -1).T
    inside = (points[:, 0] > GT[0]) & (points[:, 0] < GT[2]) & (points[:, 1] > GT[1]) & (points[:, 1] < GT[3])
    gt = torch.tensor(GT)
    coarse_boxes = ltrb_decode(points[inside], flat_c[inside])
    refined_boxes = ltrb_decode(points[inside], flat_r[inside])
    # hand-worked: a side with coarse error e is re-read where the field's error is e/2
    assert torch.allclose(refined_boxes - gt, (coarse_boxes - gt) * 0.5, atol=1e-4)
    # location (28, 28): coarse (20, 20, 40, 36), refined (16, 16, 46, 40)
    k = int(((points[:, 0] == 28) & (points[:, 1] == 28)).nonzero())
    assert torch.allclose(
        ltrb_decode(points[k], flat_r[k]), torch.tensor([16.0, 16.0, 46.0, 40.0]), atol=1e-4
    )
    iou_c = aligned_iou(coarse_boxes, gt.expand_as(coarse_boxes))
    iou_r = aligned_iou(refined_boxes, gt.expand_as(refined_boxes))
    assert (iou_r >= iou_c - 1e-6).all() and iou_r.mean() > iou_c.mean() + 0.1


def test_offsets_move_the_boundary_point():
    points, ltrb = _linear_field()
    offsets = torch.zeros(1, 8, 8, 8)
    offsets[:, 0] = -1.0  # left point moved one cell further left
    refined = refine_ltrb(ltrb, offsets, points, STRIDE)
    (k,) = ((points[:, 0] == 28) & (points[:, 1] == 28)).nonzero()[0]
    x1 = 28 - refined.reshape(4, -1)[0, k]
    # coarse left side 20 -> read at 20 - 8 = 12, where the field holds x1 = 12 + 0.5 * 0 = 12
    assert abs(float(x1) - 12.0) < 1e-4


def test_refinement_module_shapes_and_gradients():
    torch.manual_seed(0)
    module = BoxRefinement(16)
    (points,) = grid_points([(5, 7)], [16])
    feat = torch.randn(2, 16, 5, 7)
    ltrb = (torch.rand(2, 4, 5, 7) * 40).requires_grad_()
    out = module(feat, ltrb, points, 16.0)
    assert out.shape == (2, 4, 5, 7) and (out >= 0).all()
    out.sum().backward()
    assert ltrb.grad is not None and ltrb.grad.abs().sum() > 0
    assert module.offset.weight.grad is not None and module.offset.weight.grad.abs().sum() > 0


def test_constant_boxes_are_a_fixed_point():
    # every location predicts the same box: re-reading any location returns that box
    (points,) = grid_points([(6, 6)], [8])
    box = torch.tensor([10.0, 6.0, 40.0, 30.0])
    ltrb = torch.cat([points - box[:2], box[2:] - points], dim=-1).T.reshape(1, 4, 6, 6)
    inside = ((ltrb > 0).all(dim=1)).reshape(-1)
    refined = refine_ltrb(ltrb, torch.randn(1, 8, 6, 6) * 0.3, points, 8.0)
    got = ltrb_decode(points[inside], refined.reshape(4, -1).T[inside])
    assert torch.allclose(got, box.expand_as(got), atol=1e-4)
