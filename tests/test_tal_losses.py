"""TAL losses, the ATSS warm-up assigner and the small differentiable pieces of the heads."""

from __future__ import annotations

import math

import torch

from tbd.modeling.tal.assigner import TALAssignment, scatter_class_targets, task_aligned_losses
from tbd.modeling.tal.atss import ATSSAssigner
from tbd.modeling.tal.et_head import distribution_expectation
from tbd.modeling.tal.tood import aligned_logit, offset_sample
from tbd.ops.boxes import pad_boxes


def _assignment(t_hat: list[float], labels: list[int]) -> TALAssignment:
    scores = torch.tensor([t_hat])
    fg = scores > 0
    return TALAssignment(
        labels=torch.tensor([labels]),
        boxes=torch.tensor([[[0.0, 0, 10, 10]] * len(labels)]),
        scores=scores,
        fg_mask=fg,
        gt_index=torch.where(fg, 0, -1),
        ious=scores.clone(),
    )


def test_task_aligned_losses_hand_worked():
    logits = torch.zeros(1, 2, 2, requires_grad=True)  # every score 0.5
    pred = torch.tensor([[[0.0, 0, 10, 10], [0.0, 0, 5, 10]]], requires_grad=True)  # GIoU 1 and 0.5
    assignment = _assignment([0.5, 0.9], [0, 1])
    loss_cls, loss_box, norm = task_aligned_losses(logits, pred, assignment, num_classes=2)
    ln2 = math.log(2)
    # (0,0): t = s = 0.5 -> 0; two negatives 0.5^2 ln 2; (1,1): |0.9 - 0.5|^2 BCE(0.5, 0.9) = 0.16 ln 2
    assert math.isclose(norm.item(), 1.4, rel_tol=1e-6)
    assert math.isclose(loss_cls.item(), (0.25 + 0.25 + 0.16) * ln2 / 1.4, rel_tol=1e-5)
    assert math.isclose(loss_box.item(), 0.9 * 0.5 / 1.4, rel_tol=1e-5)
    (loss_cls + loss_box).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert pred.grad is not None and pred.grad[0, 1].abs().sum() > 0
    assert pred.grad[0, 0].abs().sum() == 0  # perfect box: GIoU loss at its minimum


def test_normalizer_is_at_least_one_and_background_only_batch():
    logits = torch.full((1, 2, 2), -1.0)
    _, _, norm = task_aligned_losses(logits, torch.zeros(1, 2, 4), _assignment([0.1, 0.2], [0, 0]), 2)
    assert norm.item() == 1.0
    empty = _assignment([0.0, 0.0], [2, 2])
    loss_cls, loss_box, _ = task_aligned_losses(logits, torch.zeros(1, 2, 4), empty, 2)
    p = torch.sigmoid(torch.tensor(-1.0)).item()
    assert math.isclose(loss_cls.item(), 4 * p**2 * -math.log(1 - p), rel_tol=1e-5)
    assert loss_box.item() == 0.0


def test_scatter_class_targets_background_row_is_zero():
    out = scatter_class_targets(torch.tensor([[1, 3]]), torch.tensor([[0.75, 0.5]]), num_classes=3)
    assert out.tolist() == [[[0.0, 0.75, 0.0], [0.0, 0.0, 0.0]]]


def test_aligned_logit_is_logit_of_geometric_mean_and_stable():
    p = torch.tensor([-30.0, -2.0, 0.0, 3.0, 40.0])
    m = torch.tensor([25.0, 1.0, 0.0, -4.0, 40.0])
    out = aligned_logit(p, m)
    assert torch.isfinite(out).all()
    expected = torch.sqrt(torch.sigmoid(p.double()) * torch.sigmoid(m.double()))
    torch.testing.assert_close(torch.sigmoid(out).double(), expected, rtol=1e-5, atol=1e-7)


def test_offset_sample_identity_shift_and_interpolation():
    values = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).view(2, 4, 3, 5)
    zero = torch.zeros(2, 8, 3, 5)
    torch.testing.assert_close(offset_sample(values, zero), values)
    shift = zero.clone()
    shift[:, 1::2] = 1.0  # one column right for every side
    out = offset_sample(values, shift)
    torch.testing.assert_close(out[..., :4], values[..., 1:])
    assert out[..., 4].abs().sum() == 0  # outside the map: zeros
    half = zero.clone()
    half[:, 0::2] = 0.5  # half a row down
    out = offset_sample(values, half)
    torch.testing.assert_close(out[..., 0, :], 0.5 * (values[..., 0, :] + values[..., 1, :]))
    offsets = torch.full((1, 8, 3, 5), 0.3, requires_grad=True)
    offset_sample(values[:1], offsets).sum().backward()
    assert offsets.grad is not None and offsets.grad.abs().sum() > 0


def test_distribution_expectation():
    logits = torch.full((2, 5), -1e4)
    logits[0, 2] = 0.0  # all mass on bin 2
    logits[1, 1] = logits[1, 3] = 0.0  # half on 1, half on 3
    torch.testing.assert_close(distribution_expectation(logits), torch.tensor([2.0, 2.0]))


def test_atss_warmup_assigner():
    # one level of 4x4 points, stride 8; GT over the top-left 2x2 points
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], -1) * 8 + 4
    pred = torch.cat([points - 6, points + 6], -1)[None]
    gt_boxes, gt_labels, mask = pad_boxes([torch.tensor([[0.0, 0, 16, 16]])], [torch.tensor([1])])
    out = ATSSAssigner(topk=9, anchor_scale=2.0)(pred, points, [16], [8], gt_boxes, gt_labels, mask, 2)
    assert out.fg_mask[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    # soft target = IoU of the predicted box: [-2, -2, 10, 10] vs [0, 0, 16, 16] -> 100 / (144 + 256 - 100)
    torch.testing.assert_close(out.scores[0, 0], torch.tensor(100 / 300))
    assert (out.labels[0, out.fg_mask[0]] == 1).all() and (out.labels[0, ~out.fg_mask[0]] == 2).all()


def test_atss_in_gt_blocks_equals_unchunked():
    """Blocks of GTs bound the [B, G, n] centre distances; the assignment does not change."""
    gen = torch.Generator().manual_seed(0)
    sizes, strides = [(8, 8), (4, 4)], [8, 16]
    pts = [
        torch.stack([xs.flatten(), ys.flatten()], -1) * s + s / 2
        for (h, w), s in zip(sizes, strides)
        for ys, xs in [torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")]
    ]
    points = torch.cat(pts)
    pred = torch.cat([points - 10, points + 10], -1)[None].repeat(2, 1, 1)
    xy = torch.rand(2, 15, 2, generator=gen) * 40
    boxes = [torch.cat([xy[i], xy[i] + 8 + torch.rand(15, 2, generator=gen) * 20], -1) for i in range(2)]
    labels = [torch.randint(0, 3, (15,), generator=gen) for _ in range(2)]
    gt_boxes, gt_labels, mask = pad_boxes([boxes[0], boxes[1][:9]], [labels[0], labels[1][:9]])
    args = (pred, points, [64, 16], strides, gt_boxes, gt_labels, mask, 3)
    whole = ATSSAssigner(topk=5, anchor_scale=2.0)(*args)
    blocks = ATSSAssigner(topk=5, anchor_scale=2.0, max_chunk_elements=64)(*args)  # one GT per block
    assert whole.fg_mask.sum() > 10
    assert torch.equal(whole.fg_mask, blocks.fg_mask) and torch.equal(whole.gt_index, blocks.gt_index)
    torch.testing.assert_close(whole.scores, blocks.scores)
