"""DW weighting functions against hand-worked values (METHODS.md §3)."""

from __future__ import annotations

import math

import pytest
import torch

from tbd.modeling.dw.loss import neg_log_one_minus_exp
from tbd.modeling.dw.weights import (
    center_prior,
    class_negative_probability,
    negative_probability,
    negative_weights,
    positive_weights,
)


def test_positive_weight_normalised_over_candidate_set():
    # one image, 4 points, 1 GT; the last point is not a candidate (prior 0)
    p_pos = torch.tensor([0.5, 0.2, 0.0, 0.9]).view(1, 4, 1)
    prior = torch.tensor([1.0, 0.5, 1.0, 0.0]).view(1, 4, 1)
    w = positive_weights(p_pos, prior).view(-1)
    # denominator: e^{3*0.5}*0.5*1 + e^{3*0.2}*0.2*0.5 = 2.2408445 + 0.1822119
    den = 2.4230564
    assert w[0].item() == pytest.approx(math.exp(2.5) * 0.5 / den, rel=1e-5)  # 2.51387
    assert w[0].item() == pytest.approx(2.51387, rel=1e-4)
    assert w[1].item() == pytest.approx(math.exp(1.0) * 0.1 / den, rel=1e-5)  # 0.112184
    assert w[2].item() == 0.0  # p_pos = 0
    assert w[3].item() == 0.0  # outside the candidate set


def test_positive_weight_per_gt_and_sums_to_one_when_exponents_match():
    torch.manual_seed(0)
    p_pos = torch.rand(2, 7, 3)
    prior = torch.rand(2, 7, 3) * (torch.rand(2, 7, 3) > 0.3)
    w = positive_weights(p_pos, prior, mu=4.0, mu_norm=4.0)
    has = (prior * p_pos).sum(dim=1) > 0
    sums = w.sum(dim=1)
    assert torch.allclose(sums[has], torch.ones_like(sums[has]), atol=1e-5)
    # the normalisation is per GT: scaling one GT's p_pos does not change another GT's weights
    p2 = p_pos.clone()
    p2[..., 0] *= 0.5
    w2 = positive_weights(p2, prior, mu=4.0, mu_norm=4.0)
    assert torch.allclose(w[..., 1:], w2[..., 1:])


def test_positive_weight_without_candidates_is_zero_and_detached():
    p_pos = torch.rand(1, 5, 2, requires_grad=True)
    w = positive_weights(p_pos, torch.zeros(1, 5, 2))
    assert torch.equal(w, torch.zeros_like(w))
    assert not w.requires_grad


def test_negative_probability_at_reference_ious():
    ious = torch.tensor([0.4, 0.5, 0.75, 0.95]).view(1, 4, 1)
    cand = torch.ones_like(ious, dtype=torch.bool)
    p = negative_probability(ious, cand).view(-1)
    # t(x) = (x^2 - 1)/(0.25 - 1): t(0.75) = 0.583333, t(0.95) = 0.13 (the minimum);
    # max t > 1 (IoU 0.4), so the top is clamped to 1
    assert p[0].item() == 1.0  # below 0.5: certainly a negative
    assert p[1].item() == pytest.approx(1.0, abs=1e-6)
    assert p[2].item() == pytest.approx((0.583333 - 0.13) / (1 - 0.13), abs=1e-5)  # 0.521073
    assert p[3].item() == pytest.approx(0.0, abs=1e-6)  # the best candidate of the GT


def test_negative_probability_minmax_when_all_above_threshold():
    ious = torch.tensor([0.6, 0.8, 0.3]).view(1, 3, 1)
    cand = torch.tensor([True, True, False]).view(1, 3, 1)
    p = negative_probability(ious, cand).view(-1)
    # t(0.6) = 0.853333 becomes the top (< 1): the worst candidate maps to 1, the best to 0
    assert p.tolist() == pytest.approx([1.0, 0.0, 1.0], abs=1e-6)


def test_negative_probability_no_candidates_no_nan():
    ious = torch.zeros(2, 6, 3)
    p = negative_probability(ious, torch.zeros(2, 6, 3, dtype=torch.bool))
    assert torch.equal(p, torch.ones_like(p))


def test_class_negative_probability_scatter_and_min_over_same_class():
    # 2 points, GTs: [class 1, class 1, class 0, padded]
    pair = torch.tensor([[[0.2, 0.7, 0.4, 1.0], [1.0, 0.3, 1.0, 1.0]]])
    labels = torch.tensor([[1, 1, 0, -1]])
    p = class_negative_probability(pair, labels, num_classes=3)
    assert torch.allclose(p[0], torch.tensor([[0.4, 0.2, 1.0], [1.0, 0.3, 1.0]]))


def test_importance_is_squared_score_and_detached():
    s = torch.tensor([0.3, 0.8, 0.0], requires_grad=True)
    w = negative_weights(torch.tensor([1.0, 0.5, 1.0]), s)
    assert w.tolist() == pytest.approx([0.09, 0.32, 0.0])
    assert not w.requires_grad


def test_center_prior_uses_stride_units_and_candidates():
    gt = torch.tensor([[[0.0, 0.0, 32.0, 32.0]]])
    points = torch.tensor([[16.0, 16.0], [24.0, 16.0], [24.0, 16.0], [40.0, 16.0]])
    strides = torch.tensor([8.0, 8.0, 16.0, 8.0])
    cand = torch.tensor([True, True, True, False]).view(1, 4, 1)
    prior = center_prior(points, strides, gt, cand, sigma=1.11).view(-1)
    assert prior[0].item() == pytest.approx(1.0)
    assert prior[1].item() == pytest.approx(math.exp(-1.0 / (2 * 1.11**2)), rel=1e-5)  # 0.66639
    assert prior[2].item() == pytest.approx(math.exp(-0.25 / (2 * 1.11**2)), rel=1e-5)  # 0.90353
    assert prior[3].item() == 0.0


@pytest.mark.parametrize("p", [1e-8, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_neg_log_one_minus_exp_matches_bce(p):
    got = neg_log_one_minus_exp(torch.tensor(math.log(p), dtype=torch.float64)).item()
    assert got == pytest.approx(-math.log1p(-p), rel=1e-6)


def test_neg_log_one_minus_exp_finite_gradients_at_the_ends():
    x = torch.tensor([0.0, -1e-30, -1e-3, -0.69, -0.7, -50.0, -200.0], requires_grad=True)
    y = neg_log_one_minus_exp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and y.max().item() <= 100.0
    assert torch.isfinite(x.grad).all()
