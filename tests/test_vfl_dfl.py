"""Varifocal and Distribution Focal Loss (tbd.ops.losses) by hand-worked numbers, and the ET-head's
use of them: MODEL.ETHEAD.VFL_TARGET picks the IoU or t_hat as the positives' target q."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from tbd.config import load_config
from tbd.modeling.tal.assigner import TALAssignment
from tbd.modeling.tal.testing import TINY_OPTS
from tbd.ops.losses import distribution_focal_loss, varifocal_loss

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


# ---------------------------------------------------------------------------- Varifocal loss
def test_varifocal_loss_hand_worked() -> None:
    # logits 0 -> p = 1/2; ln 3 -> p = 3/4; -ln 3 -> p = 1/4
    logits = torch.tensor([0.0, LN3, -LN3, LN3, 0.0])
    q = torch.tensor([0.6, 0.0, 0.0, 0.9, 0.0])
    got = varifocal_loss(logits, q)  # alpha 0.75, gamma 2
    want = [
        0.6 * LN2,  # positive: q * BCE(1/2, 0.6) = 0.6 ln 2
        0.75 * 0.75**2 * LN4,  # negative: alpha p^2 * -ln(1 - p)
        0.75 * 0.25**2 * math.log(4 / 3),
        0.9 * -(0.9 * math.log(0.75) + 0.1 * math.log(0.25)),  # positive at p = 3/4
        0.75 * 0.5**2 * LN2,
    ]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    # alpha and gamma reach the negatives only
    other = varifocal_loss(logits, q, alpha=0.5, gamma=1.0)
    torch.testing.assert_close(other[1], torch.tensor(0.5 * 0.75 * LN4))
    torch.testing.assert_close(other[0], got[0])


def test_varifocal_loss_weights_are_constants() -> None:
    """d/dx of q BCE(x, q) is q (p - q); of alpha p^gamma BCE(x, 0), with the weight held
    constant, alpha p^gamma p. The target gets no gradient."""
    logits = torch.tensor([0.0, LN3], requires_grad=True)
    q = torch.tensor([0.6, 0.0], requires_grad=True)
    varifocal_loss(logits, q).sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([0.6 * (0.5 - 0.6), 0.75 * 0.75**2 * 0.75]))
    assert q.grad is None


# ---------------------------------------------------------------------------- Distribution focal loss
def test_distribution_focal_loss_hand_worked() -> None:
    # bins 0..3 with probabilities 0.1, 0.2, 0.3, 0.4
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(4, 4).clone().requires_grad_(True)
    target = torch.tensor([1.25, 2.0, 0.0, 3.0])
    got = distribution_focal_loss(logits, target)
    want = [
        -(0.75 * math.log(0.2) + 0.25 * math.log(0.3)),  # 1.25: 3/4 on bin 1, 1/4 on bin 2
        -math.log(0.3),  # an integer target is one bin
        -math.log(0.1),
        -math.log(0.4),  # the last bin (clamped just below it: 1e-4 left on bin 2)
    ]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-4)
    got[0].backward()  # softmax minus the two-bin target distribution
    torch.testing.assert_close(logits.grad[0], torch.tensor([0.1, 0.2 - 0.75, 0.3 - 0.25, 0.4]))


# ---------------------------------------------------------------------------- the ET head's losses
OPTS = [*TINY_OPTS, "MODEL.ETHEAD.FEAT_CHANNELS", "64", "MODEL.ETHEAD.VFL_ALPHA", "0.6"]
# two foreground points of image 0: (flat index, level, row, col, stride, label, IoU, t_hat, GT box)
FG = [
    (10, 0, 1, 2, 8, 3, 0.6, 0.7, [4.0, 2.0, 40.0, 30.0]),  # centre (20, 12): ltrb 16, 10, 20, 18 px
    (70, 1, 1, 2, 16, 5, 0.8, 0.9, [10.0, 8.0, 60.0, 50.0]),  # centre (40, 24): ltrb 30, 16, 20, 26 px
]


def _et_losses(target: str) -> tuple[dict, object, object]:
    torch.manual_seed(0)
    model = build_model(load_config("et_R18_FPN", [*OPTS, "MODEL.ETHEAD.VFL_TARGET", target])).eval()
    assert model.vfl_target == target and model.vfl_alpha == 0.6
    with torch.no_grad():  # distributions and scores that are not uniform
        torch.nn.init.normal_(model.head.reg_pred.weight, std=0.3)
        torch.nn.init.normal_(model.head.cls_pred.weight, std=0.1)
    features = [torch.randn(1, 32, s, s) for s in (8, 4, 2, 1, 1)]  # a 64 x 64 image, p3-p7
    predictions = model.head(features)
    flat = model.flat_predictions(predictions)
    points = torch.cat(model.points(features))
    n = points.shape[0]
    labels = torch.full((1, n), model.num_classes)
    boxes, ious, scores = torch.zeros(1, n, 4), torch.zeros(1, n), torch.zeros(1, n)
    for idx, _, _, _, _, label, iou, t_hat, box in FG:
        labels[0, idx], ious[0, idx], scores[0, idx] = label, iou, t_hat
        boxes[0, idx] = torch.tensor(box)
    fg = labels < model.num_classes
    assignment = TALAssignment(labels, boxes, scores, fg, torch.where(fg, 0, -1), ious)
    losses = model.losses(flat, predictions, points, model.decode(points, flat.ltrb), assignment)
    return losses, model, predictions


@pytest.mark.parametrize("target", ["iou", "t_hat"])
def test_et_head_vfl_target_and_dfl_by_hand(target: str) -> None:
    losses, model, pred = _et_losses(target)
    normalizer = 0.7 + 0.9  # sum of t_hat over the positives (> 1)
    # VFL over every point and class: q at the positives' class, 0 elsewhere
    total = 0.0
    for level, logits in enumerate(pred.cls_logits):
        x = logits[0].detach()  # [C, H, W]
        q = torch.zeros_like(x)
        for _, lvl, row, col, _, label, iou, t_hat, _ in FG:
            if lvl == level:
                q[label, row, col] = iou if target == "iou" else t_hat
        p = x.sigmoid()
        bce = -(q * F.logsigmoid(x) + (1 - q) * F.logsigmoid(-x))  # -(q ln p + (1 - q) ln(1 - p))
        total += (torch.where(q > 0, q, 0.6 * p**2) * bce).sum()
    want_cls = model.cls_loss_weight * total / normalizer
    assert losses["loss_cls"].item() == pytest.approx(want_cls.item(), rel=1e-5)
    # DFL: each side's distance in strides against that side's 17 bins, weighted by t_hat
    dfl = 0.0
    for _, lvl, row, col, stride, _, _, t_hat, box in FG:
        cx, cy = (col + 0.5) * stride, (row + 0.5) * stride
        sides = torch.tensor([cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]) / stride
        bins = pred.reg_bins[lvl][0, :, row, col].detach().view(4, 17)
        logp = bins.log_softmax(-1)
        lo = sides.floor().long()
        per_side = -((lo + 1 - sides) * logp[range(4), lo] + (sides - lo) * logp[range(4), lo + 1])
        dfl += t_hat * per_side.mean()
    want_dfl = model.dfl_loss_weight * dfl / normalizer
    assert losses["loss_box_dfl"].item() == pytest.approx(want_dfl.item(), rel=1e-5)


def test_vfl_target_switch_changes_the_classification_loss_only() -> None:
    iou, _, _ = _et_losses("iou")
    t_hat, _, _ = _et_losses("t_hat")
    assert abs(iou["loss_cls"].item() - t_hat["loss_cls"].item()) > 1e-3 * iou["loss_cls"].item()
    for key in ("loss_box_giou", "loss_box_dfl"):
        assert iou[key].item() == pytest.approx(t_hat[key].item(), rel=1e-6)
