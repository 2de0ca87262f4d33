"""The DW loss on tiny hand-built batches: values, no-GT images, which tensors get gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tbd.modeling.dw.loss import DWLoss, DWLossConfig

# GT (0, 0, 16, 16), class 1 of 2. A: centre, exact box. B: inside, box (0, 0, 12, 16), IoU 0.75.
# C: outside the GT (a plain negative).
POINTS = torch.tensor([[8.0, 8.0], [4.0, 8.0], [30.0, 30.0]])
STRIDES = torch.tensor([8.0, 8.0, 8.0])
LTRB = torch.tensor([[[8.0, 8.0, 8.0, 8.0], [4.0, 8.0, 8.0, 8.0], [2.0, 2.0, 2.0, 2.0]]])
GT_BOXES = torch.tensor([[[0.0, 0.0, 16.0, 16.0]]])
GT_LABELS = torch.tensor([[1]])
GT_MASK = torch.tensor([[True]])


def _run(logits=None, ctr=None, ltrb=None, boxes=GT_BOXES, labels=GT_LABELS, mask=GT_MASK):
    logits = torch.zeros(1, 3, 2) if logits is None else logits
    ctr = torch.zeros(1, 3) if ctr is None else ctr
    ltrb = LTRB.clone() if ltrb is None else ltrb
    return DWLoss(DWLossConfig(num_classes=2))(logits, ltrb, ctr, POINTS, STRIDES, boxes, labels, mask)


def test_loss_values_hand_worked():
    out = _run()
    s = 0.25  # sigmoid(0) * sigmoid(0) everywhere
    p_a, p_b = s * 1.0, s * math.exp(-5 * 0.25)  # L_GIoU: A 0, B 1 - 0.75 = 0.25
    prior_a, prior_b = 1.0, math.exp(-(0.5**2) / (2 * 1.11**2))  # B is half a stride off centre
    den = math.exp(3 * p_a) * p_a * prior_a + math.exp(3 * p_b) * p_b * prior_b
    w_a = math.exp(5 * p_a) * p_a * prior_a / den
    w_b = math.exp(5 * p_b) * p_b * prior_b / den
    assert out["loss_dw_cls_pos"].item() == pytest.approx(0.25 * (w_a + w_b) * -math.log(s), rel=1e-5)
    assert out["loss_dw_loc"].item() == pytest.approx(1.25 * w_b * 0.25, rel=1e-5)
    # P_neg: A (best IoU of the GT) 0 for class 1, every other (point, class) 1;
    # normaliser sum(1 - P_neg) = 1; each of the 5 negatives costs s^2 * -log(1 - s)
    assert out["loss_dw_cls_neg"].item() == pytest.approx(5 * s**2 * -math.log(1 - s), rel=1e-5)


def test_weights_are_detached_each_term_reaches_only_its_inputs():
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    ctr = torch.zeros(1, 3, requires_grad=True)
    ltrb = LTRB.clone().requires_grad_()
    out = _run(logits, ctr, ltrb)
    g_pos = torch.autograd.grad(
        out["loss_dw_cls_pos"], [logits, ctr, ltrb], retain_graph=True, allow_unused=True
    )
    assert g_pos[0].abs().sum() > 0 and g_pos[1].abs().sum() > 0
    assert g_pos[2] is None or g_pos[2].abs().sum() == 0  # the positive weight carries no gradient
    g_loc = torch.autograd.grad(out["loss_dw_loc"], [logits, ctr, ltrb], retain_graph=True, allow_unused=True)
    assert g_loc[0] is None or g_loc[0].abs().sum() == 0
    assert g_loc[1] is None or g_loc[1].abs().sum() == 0
    assert g_loc[2][0, 1].abs().sum() > 0  # B's box is pulled towards the GT
    assert g_loc[2][0, 2].abs().sum() == 0  # C is no candidate
    g_neg = torch.autograd.grad(out["loss_dw_cls_neg"], [logits, ctr, ltrb], allow_unused=True)
    assert g_neg[0].abs().sum() > 0 and (g_neg[2] is None or g_neg[2].abs().sum() == 0)
    # the negative gradient of the GT class at A vanishes: P_neg ~ 0 there
    assert g_neg[0][0, 0, 1].abs().item() < 1e-9 and g_neg[0][0, 0, 0].abs().item() > 0


def test_no_gt_images_only_negatives_and_finite():
    logits = torch.randn(2, 3, 2, requires_grad=True)
    boxes, labels = torch.zeros(2, 1, 4), torch.full((2, 1), -1)
    out = DWLoss(DWLossConfig(num_classes=2))(
        logits,
        LTRB.expand(2, 3, 4),
        torch.zeros(2, 3),
        POINTS,
        STRIDES,
        boxes,
        labels,
        torch.zeros(2, 1, dtype=torch.bool),
    )
    assert out["loss_dw_cls_pos"].item() == 0.0 and out["loss_dw_loc"].item() == 0.0
    s = torch.sigmoid(logits.detach()) * 0.5
    expected = (s**2 * -torch.log1p(-s)).sum()  # normaliser clamps to 1
    assert out["loss_dw_cls_neg"].item() == pytest.approx(expected.item(), rel=1e-5)
    sum(out.values()).backward()
    assert torch.isfinite(logits.grad).all()


def test_mixed_batch_padded_gt_is_ignored():
    # image 0 has the GT, image 1 none: the loss equals the single-image loss plus image 1's negatives
    boxes = torch.cat([GT_BOXES, torch.zeros(1, 1, 4)])
    labels = torch.tensor([[1], [-1]])
    mask = torch.tensor([[True], [False]])
    both = DWLoss(DWLossConfig(num_classes=2))(
        torch.zeros(2, 3, 2), LTRB.expand(2, 3, 4), torch.zeros(2, 3), POINTS, STRIDES, boxes, labels, mask
    )
    single = _run()
    assert both["loss_dw_cls_pos"].item() == pytest.approx(single["loss_dw_cls_pos"].item(), rel=1e-6)
    assert both["loss_dw_loc"].item() == pytest.approx(single["loss_dw_loc"].item(), rel=1e-6)
    per_entry = 0.25**2 * -math.log(0.75)
    assert both["loss_dw_cls_neg"].item() == pytest.approx((5 + 6) * per_entry, rel=1e-5)


def _random_batch(seed: int, b: int = 3, c: int = 4, g: int = 9):
    """Points on a 64 px pyramid (strides 8, 16), random GTs, padding, and an image without GT."""
    from tbd.ops.boxes import grid_points, pad_boxes

    gen = torch.Generator().manual_seed(seed)
    levels = grid_points([(8, 8), (4, 4)], [8, 16])
    points = torch.cat(levels)
    strides = torch.cat([torch.full((len(p),), float(s)) for p, s in zip(levels, [8, 16])])
    p = points.shape[0]
    logits = torch.randn(b, p, c, generator=gen) * 2
    ctr = torch.randn(b, p, generator=gen)
    ltrb = 1 + torch.rand(b, p, 4, generator=gen) * 24
    boxes, labels = [], []
    for n in (g, g // 2, 0)[:b]:
        xy = torch.rand(n, 2, generator=gen) * 40
        boxes.append(torch.cat([xy, xy + 6 + torch.rand(n, 2, generator=gen) * 30], dim=-1))
        labels.append(torch.randint(0, c, (n,), generator=gen))
    gt_boxes, gt_labels, gt_mask = pad_boxes(boxes, labels)
    return logits, ltrb, ctr, points, strides, gt_boxes, gt_labels, gt_mask, c


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [2**24, 100])
def test_sparse_loss_matches_dense_values_and_gradients(seed: int, chunk: int) -> None:
    """Only candidate pairs are kept; the three terms and their gradients equal the dense [B, P, G] form."""
    from tbd.modeling.dw.loss import candidate_pairs
    from tbd.modeling.dw.reference import dense_dw_loss

    logits, ltrb, ctr, points, strides, gt_boxes, gt_labels, gt_mask, c = _random_batch(seed)
    cfg = DWLossConfig(num_classes=c, max_chunk_elements=chunk)
    if chunk == 100:  # one GT per block: really chunked
        assert 3 * points.shape[0] > 100
    bi, _, gi = candidate_pairs(points, gt_boxes, gt_mask, chunk)
    assert bi.numel() > 50 and gt_mask[bi, gi].all() and not (bi == 2).any()
    inputs_new = [t.clone().requires_grad_(True) for t in (logits, ltrb, ctr)]
    inputs_ref = [t.clone().requires_grad_(True) for t in (logits, ltrb, ctr)]
    new = DWLoss(cfg)(*inputs_new, points, strides, gt_boxes, gt_labels, gt_mask)
    ref = dense_dw_loss(cfg, *inputs_ref, points, strides, gt_boxes, gt_labels, gt_mask)
    for key in ref:
        assert ref[key].item() > 0
        torch.testing.assert_close(new[key], ref[key], rtol=1e-5, atol=1e-7)
        g_new = torch.autograd.grad(new[key], inputs_new, retain_graph=True, allow_unused=True)
        g_ref = torch.autograd.grad(ref[key], inputs_ref, retain_graph=True, allow_unused=True)
        for a, r in zip(g_new, g_ref):
            if r is None or a is None:
                assert (a is None or a.abs().sum() == 0) and (r is None or r.abs().sum() == 0)
            else:
                torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


def test_sparse_loss_saved_memory_grows_with_candidates_not_gts() -> None:
    """Adding 300 GTs that contain no point leaves what autograd keeps unchanged (the dense form
    keeps [B, P, G] tensors for the backward)."""
    from tbd.modeling.dw.reference import dense_dw_loss

    logits, ltrb, ctr, points, strides, gt_boxes, gt_labels, gt_mask, c = _random_batch(0)
    cfg = DWLossConfig(num_classes=c)
    tiny = torch.tensor([100.0, 100.0, 101.0, 101.0]).expand(3, 300, 4)  # outside the 64 px image
    more = (
        torch.cat([gt_boxes, tiny], dim=1),
        torch.cat([gt_labels, torch.zeros(3, 300, dtype=torch.long)], dim=1),
        torch.cat([gt_mask, torch.ones(3, 300, dtype=torch.bool)], dim=1),
    )

    def saved(fn, gts) -> int:
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        args = [t.clone().requires_grad_(True) for t in (logits, ltrb, ctr)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args, points, strides, *gts)
        return total[0]

    sparse = DWLoss(cfg)
    assert saved(sparse, more) == saved(sparse, (gt_boxes, gt_labels, gt_mask))
    dense = lambda *a: dense_dw_loss(cfg, *a)  # noqa: E731
    assert saved(dense, more) > 5 * saved(sparse, more)
