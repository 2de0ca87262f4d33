"""Hand-worked values for the TBD quantities: HS, p_c modes, p_r, HD (both forms), TFD, TWG."""

from __future__ import annotations

import math

import pytest
import torch

import tbd  # noqa: F401
from tbd.distill import (
    TaskMaps,
    TaskWeightGenerator,
    classification_probability,
    harmony_distillation_loss,
    harmony_score,
    hd_level_iou_guided,
    hd_level_plain,
    regression_probability,
    tfd_loss,
    weighted_spatial_mean,
)
from tbd.distill.losses import feature_distance


def _maps(values: list[float]) -> torch.Tensor:
    """A ``[1, 1, W]`` map (one image, one row)."""
    return torch.tensor([[values]], dtype=torch.float32)


def test_harmony_score_values_and_bounds() -> None:
    p_c = torch.tensor([0.5, 0.0, 1.0, 0.3])
    p_r = torch.tensor([0.5, 1.0, 0.0, 0.7])
    hs = harmony_score(p_c, p_r)
    tanh1 = (math.e - 1 / math.e) / (math.e + 1 / math.e)
    expected = [1.0, 1 - tanh1, 1 - tanh1, 1 - math.tanh(0.4)]
    assert hs.tolist() == pytest.approx(expected, abs=1e-6)
    # the note's form 2 e^-d / (e^-d + e^d)
    assert hs[1].item() == pytest.approx(2 * math.exp(-1) / (math.exp(-1) + math.exp(1)), abs=1e-6)
    grid = torch.linspace(0, 1, 11)
    all_hs = harmony_score(grid[:, None], grid[None, :])
    assert (all_hs > 0).all() and (all_hs <= 1).all()


def test_classification_probability_modes() -> None:
    # one image, 1x2 locations, A=2 anchors, K=2 classes; max logit: 2 at loc 0, 0 at loc 1
    logits = torch.tensor([[[[[0.0, 1.0], [2.0, -1.0]], [[-1.0, -3.0], [0.0, -2.0]]]]])
    assert logits.shape == (1, 1, 2, 2, 2)
    sig = classification_probability(logits, "sigmoid")
    assert sig.shape == (1, 1, 2)
    assert sig.flatten().tolist() == pytest.approx([1 / (1 + math.exp(-2)), 0.5], abs=1e-6)
    soft = classification_probability(logits, "spatial_softmax").flatten().tolist()
    e2 = math.exp(2)
    assert soft == pytest.approx([e2 / (e2 + 1), 1 / (e2 + 1)], abs=1e-6)
    assert sum(soft) == pytest.approx(1.0)
    max1 = classification_probability(logits, "softmax_max1").flatten().tolist()
    assert max1 == pytest.approx([1.0, math.exp(-2)], abs=1e-6)
    with pytest.raises(ValueError, match="p_c mode"):
        classification_probability(logits, "softmax")


def test_spatial_softmax_is_per_image() -> None:
    logits = torch.randn(3, 4, 5, 1, 2)
    p = classification_probability(logits, "spatial_softmax")
    assert p.flatten(1).sum(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    m = classification_probability(logits, "softmax_max1")
    assert m.flatten(1).amax(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_regression_probability_max_over_gts_and_anchors() -> None:
    boxes = torch.tensor(
        [
            [[[[0, 0, 10, 10], [0, 0, 5, 10]], [[20, 20, 30, 30], [100, 100, 110, 110]]]],
            [[[[0, 0, 10, 10], [0, 0, 5, 10]], [[20, 20, 30, 30], [100, 100, 110, 110]]]],
        ],
        dtype=torch.float32,
    )  # [B=2, H=1, W=2, A=2, 4]
    gts = torch.tensor(
        [[[0, 0, 10, 10], [20, 20, 25, 30]], [[20, 20, 30, 30], [0, 0, 0, 0]]], dtype=torch.float32
    )
    mask = torch.tensor([[True, True], [False, False]])  # image 1 has no GT (padding only)
    p_r = regression_probability(boxes, gts, mask)
    assert p_r.shape == (2, 1, 2)
    # loc 0: anchor 0 equals GT 0 -> 1; loc 1: [20,20,30,30] vs [20,20,25,30] -> 50/100
    assert p_r[0].flatten().tolist() == pytest.approx([1.0, 0.5])
    assert p_r[1].flatten().tolist() == [0.0, 0.0]


def test_regression_probability_degenerate_and_empty() -> None:
    boxes = torch.tensor([[[[[5.0, 5.0, 5.0, 5.0]], [[0.0, 0.0, 4.0, 4.0]]]]], requires_grad=True)
    gts = torch.tensor([[[3.0, 3.0, 3.0, 8.0]]])  # zero-width GT
    p_r = regression_probability(boxes, gts, torch.tensor([[True]]))
    assert torch.isfinite(p_r).all() and (p_r == 0).all()
    p_r.sum().backward()
    assert torch.isfinite(boxes.grad).all()
    empty = regression_probability(boxes, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool))
    assert empty.shape == (1, 1, 2) and (empty == 0).all()


def test_regression_probability_carries_gradient() -> None:
    boxes = torch.tensor([[[[[0.0, 0.0, 8.0, 10.0]]]]], requires_grad=True)
    p_r = regression_probability(boxes, torch.tensor([[[0.0, 0.0, 10.0, 10.0]]]), torch.tensor([[True]]))
    assert p_r.item() == pytest.approx(0.8)
    p_r.sum().backward()
    assert boxes.grad[..., 2].item() > 0  # widening the box towards the GT raises the IoU


def test_hd_plain_hand_worked() -> None:
    level1 = hd_level_plain(_maps([1.0, 0.5]), _maps([0.75, 0.5]))
    assert level1.tolist() == pytest.approx([0.125])
    # two levels summed: (0.25 + 0) / 2 + |0.2 - 0.6|
    teacher = [TaskMaps(_maps([0.0, 0.5]), _maps([0.0, 0.0])), TaskMaps(_maps([0.3]), _maps([0.3]))]
    student = [TaskMaps(_maps([0.0, 0.5]), _maps([0.0, 0.0])), TaskMaps(_maps([0.3]), _maps([0.3]))]
    assert harmony_distillation_loss(teacher, student, "plain").item() == pytest.approx(0.0)
    student[0] = TaskMaps(_maps([0.0, 0.5]), _maps([1.0, 0.0]))  # HS^s = 1 - tanh(1) at loc 0
    expected = math.tanh(1.0) / 2
    assert harmony_distillation_loss(teacher, student, "plain").item() == pytest.approx(expected, abs=1e-6)


def test_hd_iou_guided_hand_worked() -> None:
    teacher = TaskMaps(p_c=_maps([0.2, 0.9]), p_r=_maps([0.8, 0.4]))
    student = TaskMaps(p_c=_maps([0.5, 0.1]), p_r=_maps([0.4, 0.3]))
    psi0, psi1 = 0.8 * math.sqrt(1.3), 0.4 * math.sqrt(1.8)
    d0 = abs((1 - math.tanh(0.6)) - (1 - math.tanh(0.1)))
    d1 = abs((1 - math.tanh(0.5)) - (1 - math.tanh(0.2)))
    expected = (psi0 * d0 + psi1 * d1) / (psi0 + psi1)
    assert expected == pytest.approx(0.37343, abs=1e-4)
    assert hd_level_iou_guided(teacher, student).item() == pytest.approx(expected, abs=1e-6)
    assert harmony_distillation_loss([teacher], [student]).item() == pytest.approx(expected, abs=1e-6)


def test_hd_iou_guided_zero_weight_is_zero_not_nan() -> None:
    teacher = TaskMaps(p_c=_maps([0.2, 0.9]), p_r=_maps([0.0, 0.0]))  # no GT / teacher misses all
    s_pc = _maps([0.5, 0.1]).requires_grad_()
    student = TaskMaps(p_c=s_pc, p_r=_maps([0.4, 0.3]))
    loss = hd_level_iou_guided(teacher, student)
    assert loss.tolist() == [0.0]
    loss.sum().backward()
    assert torch.isfinite(s_pc.grad).all()


def test_hd_gradient_reaches_student_not_teacher() -> None:
    t_pc, t_pr = _maps([0.2, 0.9]).requires_grad_(), _maps([0.8, 0.4]).requires_grad_()
    s_pc, s_pr = _maps([0.5, 0.1]).requires_grad_(), _maps([0.4, 0.3]).requires_grad_()
    for mode in ("plain", "iou_guided"):
        for t in (t_pc, t_pr, s_pc, s_pr):
            t.grad = None
        loss = harmony_distillation_loss([TaskMaps(t_pc, t_pr)], [TaskMaps(s_pc, s_pr)], mode)
        loss.backward()
        assert t_pc.grad is None and t_pr.grad is None
        assert s_pc.grad.abs().sum() > 0 and s_pr.grad.abs().sum() > 0


def test_hd_averages_over_images() -> None:
    t = TaskMaps(torch.tensor([[[0.0]], [[0.0]]]), torch.tensor([[[1.0]], [[1.0]]]))
    s = TaskMaps(torch.tensor([[[1.0]], [[0.0]]]), torch.tensor([[[1.0]], [[1.0]]]))
    # image 0: |HS^t - HS^s| = |(1 - tanh 1) - 1|; image 1: 0
    assert harmony_distillation_loss([t], [s]).item() == pytest.approx(math.tanh(1.0) / 2, abs=1e-6)


def test_weighted_spatial_mean() -> None:
    v = torch.tensor([[[1.0, 4.0]], [[2.0, 2.0]]])
    w = torch.tensor([[[0.25, 0.75]], [[0.0, 0.0]]])
    assert weighted_spatial_mean(v, w).tolist() == [3.25, 0.0]


def test_tfd_fixed_and_twg_weights_hand_worked() -> None:
    f_t = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # [1, C=2, 1, 2]
    f_s = torch.zeros(1, 2, 1, 2, requires_grad=True)
    d = feature_distance(f_t, f_s)
    assert d.tolist() == [[[1.0, 4.0]]]  # summed over channels
    teacher = [TaskMaps(p_c=_maps([0.25, 0.75]), p_r=_maps([1.0, 0.0]))]
    fixed = tfd_loss([d], teacher, torch.tensor([0.5, 0.5]))
    assert fixed.cls.item() == pytest.approx(0.5 * 3.25)
    assert fixed.reg.item() == pytest.approx(0.5 * 1.0)
    assert fixed.loss.item() == pytest.approx(2.125)
    twg = tfd_loss([d], teacher, torch.tensor([[[0.2, 0.8]]]))
    assert twg.loss.item() == pytest.approx(0.2 * 3.25 + 0.8 * 1.0)
    twg.loss.backward()
    assert f_s.grad.abs().sum() > 0


def test_teacher_energy_normalisation_hand_worked() -> None:
    # teacher energy per location: 1 and 4 -> level mean 2.5; image 2 is the same feature x10
    f_t = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    f_t = torch.cat([f_t, 10 * f_t])  # [2, C=2, 1, 2]
    f_s = torch.zeros(2, 2, 1, 2, requires_grad=True)
    d = feature_distance(f_t, f_s, "teacher_energy")
    torch.testing.assert_close(d, torch.tensor([[[0.4, 1.6]], [[0.4, 1.6]]]))
    assert d[0].mean().item() == pytest.approx(1.0)  # a zero student is a relative error of 1
    d.sum().backward()
    # the energy is a constant: the gradient is the raw one divided by each image's energy
    energy = torch.tensor([2.5, 250.0]).view(2, 1, 1, 1)
    torch.testing.assert_close(f_s.grad, -2 * f_t / energy)


def test_teacher_energy_normalisation_is_scale_free() -> None:
    gen = torch.Generator().manual_seed(0)
    f_t, f_s = torch.randn(2, 8, 3, 4, generator=gen), torch.randn(2, 8, 3, 4, generator=gen)
    base = feature_distance(f_t, f_s, "teacher_energy")
    for scale in (1e-3, 1e4):
        torch.testing.assert_close(feature_distance(scale * f_t, scale * f_s, "teacher_energy"), base)
        raw = feature_distance(scale * f_t, scale * f_s)
        torch.testing.assert_close(raw, scale**2 * feature_distance(f_t, f_s))
    zero_teacher = feature_distance(torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), "teacher_energy")
    assert torch.isfinite(zero_teacher).all()
    with pytest.raises(ValueError, match="feature normalisation"):
        feature_distance(f_t, f_s, "l2")


def test_a_flat_teacher_level_has_nothing_to_imitate() -> None:
    # image 0: the level's teacher energy (1e-10) is below 1e-4 of that image's strongest level (2.5),
    # so its distance is 0 instead of 1 / 1e-6 (the ENERGY_EPS floor); image 1 is an ordinary level
    f_t = torch.tensor([[[[1e-5, 0.0]], [[0.0, 1e-5]]], [[[1.0, 0.0]], [[0.0, 2.0]]]])
    f_s = torch.ones(2, 2, 1, 2)
    max_energy = torch.tensor([2.5, 2.5])
    d = feature_distance(f_t, f_s, "teacher_energy", max_energy)
    torch.testing.assert_close(d[0], torch.zeros(1, 2))
    torch.testing.assert_close(d[1], torch.tensor([[1.0 + 0.0, 1.0 + 1.0]]) / 2.5)
    assert feature_distance(f_t, f_s, "teacher_energy")[0].min() > 1e5  # without it: swamped


def test_tfd_two_levels_and_empty_regression_mask() -> None:
    d1 = torch.tensor([[[2.0, 2.0]]])
    d2 = torch.tensor([[[3.0]]])
    teacher = [TaskMaps(_maps([1.0, 1.0]), _maps([0.0, 0.0])), TaskMaps(_maps([0.5]), _maps([0.0]))]
    out = tfd_loss([d1, d2], teacher, torch.tensor([1.0, 1.0]))
    assert out.cls.item() == pytest.approx(2.0 + 3.0)
    assert out.reg.item() == 0.0 and torch.isfinite(out.loss)


def test_twg_weights_bounds_start_and_gradient() -> None:
    torch.manual_seed(0)
    twg = TaskWeightGenerator(hidden_dim=8, min_weight=0.1)
    maps = [TaskMaps(torch.rand(3, 4, 4), torch.rand(3, 4, 4)) for _ in range(2)]
    w = twg.weights_for(maps, maps)
    assert w.shape == (3, 2, 2)
    assert torch.allclose(w, torch.full_like(w, 0.5))  # zero-initialised last layer
    d = [10 * m.p_c for m in maps]  # the cls- and reg-weighted means differ -> dL/dz != 0
    tfd_loss(d, maps, w).loss.backward()
    assert twg.fc1.weight.grad is not None and twg.fc2.weight.grad.abs().sum() > 0
    with torch.no_grad():
        twg.fc2.bias.copy_(torch.tensor([50.0, -50.0]))
    w = twg.weights_for(maps, maps)
    assert w[..., 0].max().item() == pytest.approx(0.9) and w[..., 1].min().item() == pytest.approx(0.1)
    assert torch.allclose(w.sum(dim=-1), torch.ones(3, 2))


def test_twg_inputs_are_detached_by_default() -> None:
    s_pc = torch.rand(1, 2, 2, requires_grad=True)
    twg = TaskWeightGenerator()
    t = TaskMaps(torch.rand(1, 2, 2), torch.rand(1, 2, 2))
    w = twg.weights_for([t], [TaskMaps(s_pc, torch.rand(1, 2, 2))])
    w.sum().backward()
    assert s_pc.grad is None


def _random_pr_case(seed: int, b: int = 3, h: int = 5, w: int = 7, a: int = 3, g: int = 23):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, h, w, a, 2, generator=gen) * 100
    wh = 1 + torch.rand(b, h, w, a, 2, generator=gen) * 40
    boxes = torch.cat([xy, xy + wh], dim=-1)
    boxes[0, 0, 0, 0] = torch.tensor([10.0, 10.0, 10.0, 30.0])  # a degenerate predicted box
    gxy = torch.rand(b, g, 2, generator=gen) * 100
    gt = torch.cat([gxy, gxy + 2 + torch.rand(b, g, 2, generator=gen) * 50], dim=-1)
    gt[0, 1] = torch.tensor([5.0, 5.0, 5.0, 9.0])  # a zero-width GT
    mask = torch.ones(b, g, dtype=torch.bool)
    mask[1, g // 2 :] = False  # padding in image 1
    gt[1, g // 2 :] = 0.0
    mask[2] = False  # image 2 has no GT at all
    gt[2] = 0.0
    return boxes, gt, mask


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [2**22, 7, 1000])
def test_regression_probability_matches_dense_values_and_gradients(seed: int, chunk: int) -> None:
    """The chunked argmax + one differentiable IoU per box equals the dense max over every GT."""
    from tbd.distill.testing import dense_regression_probability
    from tbd.ops.boxes import best_iou_match

    boxes, gt, mask = _random_pr_case(seed)
    if chunk == 7:  # one GT per block: really chunked
        _, index = best_iou_match(boxes.flatten(1, 3), gt, mask, max_chunk_elements=chunk)
        assert index.shape == (3, 105) and (index[0] > 0).any()
    weights = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(seed + 10))
    x_new = boxes.clone().requires_grad_(True)
    x_ref = boxes.clone().requires_grad_(True)
    new = regression_probability(x_new, gt, mask, max_chunk_elements=chunk)
    ref = dense_regression_probability(x_ref, gt, mask)
    assert (ref[0] > 0.05).sum() > 10 and (ref[2] == 0).all()  # the case exercises real overlaps
    torch.testing.assert_close(new, ref, rtol=0, atol=0)
    (new * weights).sum().backward()
    (ref * weights).sum().backward()
    assert x_ref.grad.abs().sum() > 0
    torch.testing.assert_close(x_new.grad, x_ref.grad)


def test_regression_probability_saved_memory_does_not_grow_with_gts() -> None:
    """What autograd keeps for the backward is O(B H W A): the same for 5 and for 400 GTs
    (the dense form keeps [B, H W A, G] tensors, 80x more at 400 GTs)."""
    from tbd.distill.testing import dense_regression_probability

    def saved_bytes(fn, g: int) -> int:
        gen = torch.Generator().manual_seed(0)
        boxes = torch.rand(2, 6, 8, 3, 4, generator=gen) * 50
        boxes = torch.cat([boxes[..., :2], boxes[..., :2] + 5 + boxes[..., 2:]], dim=-1).requires_grad_(True)
        gxy = torch.rand(2, g, 2, generator=gen) * 50
        gt = torch.cat([gxy, gxy + 10], dim=-1)
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(boxes, gt, torch.ones(2, g, dtype=torch.bool)).sum()
        return total[0]

    assert saved_bytes(regression_probability, 5) == saved_bytes(regression_probability, 400)
    assert saved_bytes(dense_regression_probability, 400) > 20 * saved_bytes(regression_probability, 400)
