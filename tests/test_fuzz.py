"""Property-based fuzzing of the TBD, TAL and DW tensor code (hypothesis).

Inputs are random but awkward on purpose: boxes that are degenerate, inverted, far outside the
image or huge; images with 0..50 ground truths padded to a common ``G``; logits of large magnitude.
Every test checks finiteness, shapes and the documented bounds; several also check an invariant
that ties the output to its definition (padding never matters, chunking never matters, ...).
Tensors come from a drawn seed and a ``torch.Generator``, so a failure replays exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from tbd.distill.config import PC_MODES
from tbd.distill.losses import (
    TaskMaps,
    feature_distance,
    harmony_distillation_loss,
    tfd_loss,
)
from tbd.distill.task_probs import classification_probability, harmony_score, regression_probability
from tbd.distill.twg import TaskWeightGenerator
from tbd.modeling.dw.loss import DWLoss, DWLossConfig
from tbd.modeling.dw.weights import (
    center_prior,
    class_negative_probability,
    negative_probability,
    negative_weights,
    positive_weights,
)
from tbd.modeling.tal.assigner import TaskAlignedAssigner, task_aligned_losses
from tbd.ops.boxes import aligned_iou, grid_points, pad_boxes, pairwise_iou, points_in_boxes

FUZZ = settings(deadline=None, max_examples=30)
#: the dense [B, points, G] tests: fewer examples keep the file well under a minute on 2 cores
FUZZ_DENSE = settings(deadline=None, max_examples=20)
TOL = 1e-5

seeds = st.integers(min_value=0, max_value=2**31 - 1)
#: per-image GT counts: empty images and crowded ones in the same batch
gt_counts = st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=3)
image_sizes = st.tuples(st.integers(min_value=16, max_value=128), st.integers(min_value=16, max_value=128))
logit_scales = st.sampled_from([0.1, 1.0, 8.0, 50.0, 1e3, 1e4])


# --------------------------------------------------------------------------------- generators
def awkward_boxes(gen: torch.Generator, shape: tuple[int, ...], width: int, height: int) -> Tensor:
    """``[*shape, 4]`` boxes; each one at random: ordinary, zero-width, inverted, outside or huge."""
    n = math.prod(shape)
    size = torch.tensor([width, height, width, height], dtype=torch.float32)
    xy = torch.rand(n, 2, generator=gen) * size[:2]
    wh = torch.rand(n, 2, generator=gen) * size[:2] * 0.8 + 1.0
    ordinary = torch.cat([xy, xy + wh], dim=1)
    kind = torch.randint(0, 6, (n, 1), generator=gen)
    zero_width = torch.cat([xy, xy[:, :1], xy[:, 1:] + wh[:, 1:]], dim=1)
    inverted = torch.cat([xy + wh, xy], dim=1)
    outside = ordinary + size * 3.0
    huge = torch.cat([xy - 1e5, xy + 1e5], dim=1)
    boxes = ordinary
    for k, alt in enumerate((zero_width, inverted, outside, huge), start=1):
        boxes = torch.where(kind == k, alt, boxes)
    return boxes.view(*shape, 4)


def ordinary_boxes(gen: torch.Generator, n: int, width: int, height: int) -> Tensor:
    """``[n, 4]`` boxes of at least 2 px that overlap the image (the validated-data case)."""
    size = torch.tensor([width, height], dtype=torch.float32)
    xy = torch.rand(n, 2, generator=gen) * size * 0.9
    wh = torch.rand(n, 2, generator=gen) * size * 0.7 + 2.0
    return torch.cat([xy, xy + wh], dim=1)


@dataclass
class GTBatch:
    boxes: Tensor  # [B, G, 4] with garbage in the padded slots
    labels: Tensor  # [B, G], -1 where padded
    mask: Tensor  # [B, G]
    counts: list[int]


def gt_batch(
    gen: torch.Generator, counts: list[int], width: int, height: int, num_classes: int, awkward: bool
) -> GTBatch:
    boxes = [
        awkward_boxes(gen, (n,), width, height) if awkward else ordinary_boxes(gen, n, width, height)
        for n in counts
    ]
    labels = [torch.randint(0, num_classes, (n,), generator=gen) for n in counts]
    padded, padded_labels, mask = pad_boxes(boxes, labels)
    # padding must never matter: fill it with boxes that would win everything if it were read
    garbage = torch.tensor([-1e4, -1e4, 1e4, 1e4]).expand_as(padded)
    padded = torch.where(mask[..., None], padded, garbage)
    return GTBatch(padded, padded_labels, mask, counts)


def assert_finite(*tensors: Tensor) -> None:
    for t in tensors:
        assert torch.isfinite(t).all(), t


# --------------------------------------------------------------------------------- TBD: p_c, p_r, HS
@FUZZ
@given(
    seed=seeds,
    batch=st.integers(1, 3),
    hw=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    anchors=st.integers(1, 3),
    classes=st.integers(1, 9),
    scale=logit_scales,
)
def test_classification_probability_all_modes(seed, batch, hw, anchors, classes, scale) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, *hw, anchors, classes, generator=gen) * scale
    top = logits.flatten(-2).amax(-1)
    for mode in PC_MODES:
        p_c = classification_probability(logits, mode)
        assert p_c.shape == (batch, *hw)
        assert_finite(p_c)
        assert (p_c >= 0).all() and (p_c <= 1).all(), mode
        # the map is monotone in the location's best logit, whatever the mode
        order = top.flatten(1).argsort(dim=1)
        ranked = p_c.flatten(1).gather(1, order)
        assert (ranked[:, 1:] >= ranked[:, :-1]).all(), mode
    spatial = classification_probability(logits, "spatial_softmax").flatten(1).sum(1)
    torch.testing.assert_close(spatial, torch.ones(batch), atol=1e-4, rtol=0)
    max1 = classification_probability(logits, "softmax_max1").flatten(1).amax(1)
    torch.testing.assert_close(max1, torch.ones(batch))


@FUZZ
@given(
    seed=seeds,
    counts=gt_counts,
    size=image_sizes,
    hw=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    anchors=st.integers(1, 3),
)
def test_regression_probability_bounds_padding_and_gradient(seed, counts, size, hw, anchors) -> None:
    gen = torch.Generator().manual_seed(seed)
    gt = gt_batch(gen, counts, *size, num_classes=3, awkward=True)
    boxes = awkward_boxes(gen, (len(counts), *hw, anchors), *size).requires_grad_()
    p_r = regression_probability(boxes, gt.boxes, gt.mask)
    assert p_r.shape == (len(counts), *hw)
    assert_finite(p_r)
    assert (p_r >= 0).all() and (p_r <= 1 + TOL).all()
    for i, n in enumerate(counts):
        if n == 0:
            assert (p_r[i] == 0).all()
        else:  # only the image's real GTs count: recompute from its unpadded list
            own = pairwise_iou(boxes[i].detach().reshape(-1, 4), gt.boxes[i, :n])
            expected = own.amax(-1).view(*hw, anchors).amax(-1)
            torch.testing.assert_close(p_r[i].detach(), expected)
    p_r.sum().backward()
    assert_finite(boxes.grad)


@FUZZ
@given(seed=seeds, n=st.integers(1, 200), exact=st.booleans())
def test_harmony_score_in_unit_interval(seed, n, exact) -> None:
    gen = torch.Generator().manual_seed(seed)
    p_c, p_r = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    if exact:  # the ends of the range and perfect agreement
        p_c[: n // 2] = torch.randint(0, 2, (n // 2,), generator=gen).float()
        p_r[: n // 3] = p_c[: n // 3]
    hs = harmony_score(p_c, p_r)
    assert_finite(hs)
    assert (hs > 0).all() and (hs <= 1).all()
    assert (hs >= 1 - math.tanh(1.0) - TOL).all()  # |p_r - p_c| <= 1
    assert (hs[p_c == p_r] == 1).all()


# --------------------------------------------------------------------------------- TBD: HD, TFD, TWG
def _task_maps(
    gen: torch.Generator,
    gt: GTBatch,
    size: tuple[int, int],
    hws: list[tuple[int, int]],
    scale: float,
    mode: str,
) -> tuple[list[TaskMaps], list[Tensor]]:
    """Task maps of one model at each level, from random logits and awkward decoded boxes."""
    maps, leaves = [], []
    b = gt.boxes.shape[0]
    for h, w in hws:
        logits = (torch.randn(b, h, w, 1, 4, generator=gen) * scale).requires_grad_()
        boxes = awkward_boxes(gen, (b, h, w, 1), *size).requires_grad_()
        maps.append(
            TaskMaps(
                classification_probability(logits, mode), regression_probability(boxes, gt.boxes, gt.mask)
            )
        )
        leaves += [logits, boxes]
    return maps, leaves


@FUZZ
@given(
    seed=seeds,
    counts=gt_counts,
    size=image_sizes,
    levels=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=3),
    scale=logit_scales,
    pc_mode=st.sampled_from(PC_MODES),
    channels=st.integers(1, 8),
    feature_scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3]),
    min_weight=st.floats(0.0, 0.49),
)
def test_hd_tfd_twg_finite_nonnegative_bounded(
    seed, counts, size, levels, scale, pc_mode, channels, feature_scale, min_weight
) -> None:
    gen = torch.Generator().manual_seed(seed)
    gt = gt_batch(gen, counts, *size, num_classes=4, awkward=True)
    teacher, _ = _task_maps(gen, gt, size, levels, scale, pc_mode)
    student, leaves = _task_maps(gen, gt, size, levels, scale, pc_mode)

    for mode in ("iou_guided", "plain"):
        hd = harmony_distillation_loss(teacher, student, mode)
        assert hd.shape == () and torch.isfinite(hd) and hd >= 0
        # each level adds at most max |HS^t - HS^s| <= tanh(1) per image
        assert hd <= len(levels) * math.tanh(1.0) + TOL
        grads = torch.autograd.grad(hd, leaves, allow_unused=True, retain_graph=True)
        assert_finite(*(g for g in grads if g is not None))
    if sum(counts) == 0:  # psi = p_r^t = 0 everywhere: IoU-guided HD is exactly 0, not NaN
        assert harmony_distillation_loss(teacher, student, "iou_guided") == 0

    twg = TaskWeightGenerator(hidden_dim=8, min_weight=min_weight)
    with torch.no_grad():  # a trained, saturated generator, not the (0.5, 0.5) initialisation
        for p in twg.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 50)
    weights = twg.weights_for(teacher, student)
    assert weights.shape == (len(counts), len(levels), 2)
    assert_finite(weights)
    assert (weights >= min_weight - TOL).all() and (weights <= 1 - min_weight + TOL).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(counts), len(levels)))

    distances = []
    for h, w in levels:
        f_t = torch.randn(len(counts), channels, h, w, generator=gen) * feature_scale
        f_s = (torch.randn(len(counts), channels, h, w, generator=gen) * feature_scale).requires_grad_()
        d = feature_distance(f_t, f_s)
        assert d.shape == (len(counts), h, w) and (d >= 0).all()
        d_rel = feature_distance(f_t, f_s, "teacher_energy")
        assert_finite(d_rel)
        assert d_rel.shape == d.shape and (d_rel >= 0).all()
        distances.append(d)
    for task_weights in (weights, torch.tensor([0.5, 0.5])):
        terms = tfd_loss(distances, teacher, task_weights)
        for value in (terms.loss, terms.cls, terms.reg):
            assert torch.isfinite(value) and value >= 0
        torch.testing.assert_close(terms.loss, terms.cls + terms.reg)
        # a weighted mean of d never exceeds its largest value (weights <= 1, summed over levels)
        bound = sum(float(d.detach().max()) for d in distances)
        assert terms.loss <= bound * (1 + TOL) + TOL


# --------------------------------------------------------------------------------- TAL
STRIDES = (8, 16, 32)


def _points(size: tuple[int, int]) -> Tensor:
    w, h = size
    shapes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    return torch.cat(grid_points(shapes, STRIDES))


@FUZZ_DENSE
@given(
    seed=seeds,
    counts=gt_counts,
    size=image_sizes,
    classes=st.integers(1, 6),
    scale=logit_scales,
    topk=st.integers(1, 13),
    exponents=st.sampled_from([(1.0, 6.0), (1.0, 1.0), (0.5, 2.0)]),
    chunk=st.sampled_from([1, 97, 2**22]),
    awkward_gt=st.booleans(),
)
def test_tal_assigner_invariants(
    seed, counts, size, classes, scale, topk, exponents, chunk, awkward_gt
) -> None:
    gen = torch.Generator().manual_seed(seed)
    points = _points(size)
    b, a = len(counts), points.shape[0]
    gt = gt_batch(gen, counts, *size, num_classes=classes, awkward=awkward_gt)
    scores = (torch.randn(b, a, classes, generator=gen) * scale).sigmoid()
    pred = awkward_boxes(gen, (b, a), *size)
    alpha, beta = exponents
    assigner = TaskAlignedAssigner(topk=topk, alpha=alpha, beta=beta, max_chunk_elements=chunk)
    out = assigner(scores, pred, points, gt.boxes, gt.labels, gt.mask, classes)

    assert out.labels.shape == out.scores.shape == out.fg_mask.shape == out.gt_index.shape == (b, a)
    assert out.boxes.shape == (b, a, 4) and out.ious.shape == (b, a)
    assert_finite(out.scores, out.ious, out.boxes)
    fg = out.fg_mask
    assert ((out.labels >= 0) & (out.labels <= classes)).all()
    assert torch.equal(fg, out.labels < classes) and torch.equal(fg, out.gt_index >= 0)
    assert (out.scores >= 0).all() and (out.scores <= 1 + TOL).all()
    assert (out.scores[~fg] == 0).all() and (out.ious[~fg] == 0).all()

    for i, n in enumerate(counts):
        owners = out.gt_index[i]
        assert (owners < n).all()  # padded slots never own a point
        if not fg[i].any():
            continue
        idx = owners[fg[i]]
        torch.testing.assert_close(out.boxes[i, fg[i]], gt.boxes[i, idx])
        assert torch.equal(out.labels[i, fg[i]], gt.labels[i, idx])
        inside = points_in_boxes(points, gt.boxes[i])  # [A, G]
        assert inside[fg[i].nonzero().squeeze(1), idx].all()  # a positive lies inside its GT
        ious = aligned_iou(pred[i, fg[i]], gt.boxes[i, idx])
        torch.testing.assert_close(out.ious[i, fg[i]], ious)
        per_gt = torch.bincount(idx, minlength=n)
        assert (per_gt <= topk).all()
        # normalised target: per instance, the largest t_hat equals the largest IoU of its
        # positives. The normaliser max(t) is clamped at 1e-12 (as the reference code's eps): an
        # instance whose best metric s^a u^b is below that (e.g. IoU < 1% with beta = 6) keeps
        # t_hat <= its IoU instead.
        s = scores[i, fg[i]].gather(1, out.labels[i, fg[i]][:, None]).squeeze(1)
        metric = s.pow(alpha) * ious.pow(beta)
        assert (metric > 0).all()  # a zero-metric candidate is never a positive
        for g in idx.unique():
            sel = idx == g
            assert out.scores[i, fg[i]][sel].max() <= ious[sel].max() + TOL
            if metric[sel].max() >= 1e-12:
                torch.testing.assert_close(out.scores[i, fg[i]][sel].max(), ious[sel].max())

    # chunking is a memory bound, not a different algorithm
    whole = TaskAlignedAssigner(topk=topk, alpha=alpha, beta=beta)
    ref = whole(scores, pred, points, gt.boxes, gt.labels, gt.mask, classes)
    assert torch.equal(ref.fg_mask, out.fg_mask) and torch.equal(ref.gt_index, out.gt_index)
    torch.testing.assert_close(ref.scores, out.scores)

    logits = (torch.randn(b, a, classes, generator=gen) * scale).requires_grad_()
    boxes = pred.clone().requires_grad_()
    loss_cls, loss_box, norm = task_aligned_losses(logits, boxes, out, classes)
    assert_finite(loss_cls, loss_box)
    assert loss_cls >= 0 and loss_box >= 0 and norm >= 1
    assert loss_box <= 2 * out.scores.sum() / norm + TOL  # GIoU loss <= 2, weighted by t_hat
    grads = torch.autograd.grad(loss_cls + loss_box, [logits, boxes])
    assert_finite(*grads)


# --------------------------------------------------------------------------------- DW
@FUZZ_DENSE
@given(
    seed=seeds,
    counts=gt_counts,
    size=image_sizes,
    classes=st.integers(1, 6),
    mus=st.sampled_from([(5.0, 3.0), (4.0, 4.0), (1.0, 0.0)]),
)
def test_dw_weight_functions_bounds(seed, counts, size, classes, mus) -> None:
    gen = torch.Generator().manual_seed(seed)
    points = _points(size)
    strides = torch.cat(
        [torch.full((math.ceil(size[1] / s) * math.ceil(size[0] / s),), float(s)) for s in STRIDES]
    )
    b, p = len(counts), points.shape[0]
    gt = gt_batch(gen, counts, *size, num_classes=classes, awkward=True)
    cand = points_in_boxes(points, gt.boxes) & gt.mask[:, None, :]
    g = gt.boxes.shape[1]

    prior = center_prior(points, strides, gt.boxes, cand)
    assert prior.shape == (b, p, g)
    assert_finite(prior)
    assert (prior >= 0).all() and (prior <= 1).all() and (prior[~cand] == 0).all()

    p_pos = torch.rand(b, p, g, generator=gen) * torch.randint(0, 2, (b, p, g), generator=gen)
    mu, mu_norm = mus
    w_pos = positive_weights(p_pos, prior, mu, mu_norm)
    assert_finite(w_pos)
    # each weight is exp((mu - mu_norm) p) times its share of the normaliser
    assert (w_pos >= 0).all() and (w_pos <= math.exp(max(mu - mu_norm, 0.0)) + TOL).all()
    assert (w_pos[~cand] == 0).all()

    ious = torch.rand(b, p, g, generator=gen) * cand
    pair = negative_probability(ious, cand)
    assert_finite(pair)
    assert (pair >= 0).all() and (pair <= 1 + TOL).all() and (pair[~cand] == 1).all()
    assert (pair[(ious < 0.5) & cand] == 1).all()
    per_class = class_negative_probability(pair, gt.labels, classes)
    assert per_class.shape == (b, p, classes)
    assert (per_class >= 0).all() and (per_class <= 1 + TOL).all()
    w_neg = negative_weights(per_class, torch.rand(b, p, classes, generator=gen))
    assert_finite(w_neg)
    assert (w_neg >= 0).all() and (w_neg <= 1 + TOL).all()


@FUZZ_DENSE
@given(seed=seeds, counts=gt_counts, size=image_sizes, classes=st.integers(1, 6), scale=logit_scales)
def test_dw_loss_finite_with_finite_gradients(seed, counts, size, classes, scale) -> None:
    gen = torch.Generator().manual_seed(seed)
    points = _points(size)
    strides = torch.cat(
        [torch.full((math.ceil(size[1] / s) * math.ceil(size[0] / s),), float(s)) for s in STRIDES]
    )
    b, p = len(counts), points.shape[0]
    gt = gt_batch(gen, counts, *size, num_classes=classes, awkward=True)
    logits = (torch.randn(b, p, classes, generator=gen) * scale).requires_grad_()
    ctr = (torch.randn(b, p, generator=gen) * scale).requires_grad_()
    kind = torch.randint(0, 3, (b, p, 1), generator=gen)
    ltrb = torch.rand(b, p, 4, generator=gen) * max(size)
    ltrb = torch.where(kind == 1, torch.zeros_like(ltrb), torch.where(kind == 2, ltrb * 1e4, ltrb))
    ltrb.requires_grad_()
    losses = DWLoss(DWLossConfig(num_classes=classes))(
        logits, ltrb, ctr, points, strides, gt.boxes, gt.labels, gt.mask
    )
    assert set(losses) == {"loss_dw_cls_pos", "loss_dw_loc", "loss_dw_cls_neg"}
    for value in losses.values():
        assert value.shape == () and torch.isfinite(value) and value >= 0
    if sum(counts) == 0:
        assert losses["loss_dw_cls_pos"] == 0 and losses["loss_dw_loc"] == 0
    grads = torch.autograd.grad(sum(losses.values()), [logits, ctr, ltrb])
    assert_finite(*grads)


def test_dw_loss_gradient_finite_when_several_classes_saturate() -> None:
    """Regression (found by the test above): with s = sigmoid(cls) sigmoid(ctr) within ~1e-38 of 1
    for several classes of one location, the centerness gradient summed C values of ~1e38 and
    overflowed to inf. The background term now floors 1 - s at 1e-30."""
    points = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
    strides = torch.tensor([8.0, 8.0])
    classes = 20
    logits = torch.full((1, 2, classes), 1000.0, requires_grad=True)
    ctr = torch.tensor([[87.0, 87.0]], requires_grad=True)  # 1 - s = sigmoid(-87) = 1.6e-38
    ltrb = torch.full((1, 2, 4), 4.0, requires_grad=True)
    gt = torch.zeros(1, 1, 4)
    losses = DWLoss(DWLossConfig(num_classes=classes))(
        logits, ltrb, ctr, points, strides, gt, torch.full((1, 1), -1), torch.zeros(1, 1, dtype=torch.bool)
    )
    # 40 (point, class) pairs, each at the cap -log(1e-30); normaliser: clamp(sum(1 - P_neg), 1) = 1
    assert losses["loss_dw_cls_neg"].item() == pytest.approx(2 * classes * -math.log(1e-30), rel=1e-4)
    grads = torch.autograd.grad(sum(losses.values()), [logits, ctr, ltrb])
    assert_finite(*grads)
