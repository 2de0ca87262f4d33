"""DISTILL.GATE: the student-aware gate, by hand-worked values, and its wiring into every term."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import tbd  # noqa: F401
import tbd.distill.distiller as distiller_module
from tbd.distill.gate import level_gates, location_gate, ramp
from tbd.distill.losses import (
    TaskMaps,
    harmony_distillation_loss,
    hd_level_iou_guided,
    hd_level_plain,
    tfd_loss,
)
from tbd.distill.peers import cls_mask_mimic_loss, mimic_mse_loss
from tbd.distill.testing import distill_config, synthetic_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _maps(p_c: list[float], p_r: list[float]) -> TaskMaps:
    return TaskMaps(torch.tensor([[p_c]]), torch.tensor([[p_r]]))  # [B=1, H=1, W=n]


def test_ramp_by_hand() -> None:
    gap = torch.tensor([-0.1, -0.05, 0.0, 0.025, 0.05, 0.2])
    assert ramp(gap, 0.05).tolist() == pytest.approx([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])
    assert ramp(gap, 0.0).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # a hard step: the teacher leads
    g = ramp(torch.tensor([0.01], requires_grad=True), 0.05)
    assert not g.requires_grad  # detached: a weight, not a path for gradient


def test_harmony_and_iou_gates_by_hand() -> None:
    # HS = 1 - tanh|p_r - p_c|: teacher (0.8, 0.8) -> 1; student (0.8, 0.7) -> 1 - tanh 0.1
    teacher = _maps([0.8, 0.2], [0.8, 0.9])
    student = _maps([0.8, 0.2], [0.7, 0.9])
    hs_s0 = 1.0 - math.tanh(0.1)
    gap0 = 1.0 - hs_s0  # 0.0997: the teacher is more harmonious at location 0, equal at 1
    g = location_gate("harmony", teacher, student, 0.2)
    assert g[0, 0].tolist() == pytest.approx([(gap0 + 0.2) / 0.4, 0.5], abs=1e-6)
    g = location_gate("iou", teacher, student, 0.05)  # p_r gap 0.1 and 0: [1, 0.5]
    assert g[0, 0].tolist() == pytest.approx([1.0, 0.5])
    g = location_gate("iou", student, teacher, 0.05)  # the student fits better: no distillation there
    assert g[0, 0].tolist() == pytest.approx([0.0, 0.5])
    assert location_gate("none", teacher, student, 0.05) is None and level_gates("none", [], [], 0.1) is None
    with pytest.raises(ValueError, match="unknown gate"):
        location_gate("both", teacher, student, 0.05)


def test_quality_gate_by_hand() -> None:
    # q = sqrt(p_c p_r). Location 0: a trained teacher (0.36, 0.81) -> q = 0.54 beside an untrained
    # student (0.01, 0.16) -> q = 0.04: the teacher leads. The harmony gate says the opposite there
    # (HS^s = 1 - tanh 0.15 > HS^t = 1 - tanh 0.45): the case the quality gate is for.
    # Location 1: the student leads (0.64, 0.81) -> 0.72 against the teacher's (0.25, 0.81) -> 0.45.
    # Location 2: q^t = sqrt(0.5 * 0.5) = 0.5, q^s = sqrt(0.49 * 0.49) = 0.49: gap 0.01.
    teacher = _maps([0.36, 0.25, 0.5], [0.81, 0.81, 0.5])
    student = _maps([0.01, 0.64, 0.49], [0.16, 0.81, 0.49])
    g = location_gate("quality", teacher, student, 0.05)
    assert g[0, 0].tolist() == pytest.approx([1.0, 0.0, (0.01 + 0.05) / 0.1], abs=1e-6)
    assert location_gate("harmony", teacher, student, 0.05)[0, 0, 0].item() == 0.0
    g = location_gate("quality", student, teacher, 0.05)  # roles swapped: the gate flips
    assert g[0, 0].tolist() == pytest.approx([0.0, 1.0, (-0.01 + 0.05) / 0.1], abs=1e-6)


def test_gated_terms_by_hand() -> None:
    teacher = _maps([0.9, 0.9], [0.5, 0.5])  # psi = p_r^t sqrt(1 + |p_c^t - p_c^s|) = 0.5 at both
    student = _maps([0.9, 0.9], [0.0, 0.3])
    hs_t, hs_s = teacher.hs[0, 0], student.hs[0, 0]
    diff = (hs_t - hs_s).abs()
    gate = torch.tensor([[[1.0, 0.0]]])
    # IoU-guided HD keeps sum psi as its normaliser: (0.5 * d0 * 1 + 0.5 * d1 * 0) / (0.5 + 0.5)
    assert hd_level_iou_guided(teacher, student, gate).item() == pytest.approx(diff[0].item() / 2)
    assert hd_level_plain(teacher.hs, student.hs, gate).item() == pytest.approx(diff[0].item() / 2)
    assert harmony_distillation_loss([teacher], [student], "plain", [gate]).item() == pytest.approx(
        diff[0].item() / 2
    )
    d = [torch.tensor([[[2.0, 4.0]]])]
    g = [torch.tensor([[[0.5, 1.0]]])]
    t_maps = [_maps([1.0, 1.0], [1.0, 0.0])]
    # TFD: c = (1 * 0.5 * 2 + 1 * 1 * 4) / 2 = 2.5, r = (1 * 0.5 * 2) / 1 = 1; fixed (0.5, 0.5)
    terms = tfd_loss(d, t_maps, torch.tensor([0.5, 0.5]), g)
    assert (terms.cls.item(), terms.reg.item()) == pytest.approx((1.25, 0.5))
    assert mimic_mse_loss(d, g).item() == pytest.approx((1.0 + 4.0) / 2)
    assert cls_mask_mimic_loss(d, [torch.tensor([[[1.0, 3.0]]])], g).item() == pytest.approx((1 + 12) / 4)


def _model(opts: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    small = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]
    return build_model(distill_config("retinanet_R18_FPN", "retinanet_R18_FPN", small + opts))


@pytest.mark.parametrize("method", ["tbd", "mimic_mse", "cls_mask_mimic"])
def test_a_zero_gate_leaves_exactly_the_students_detector_loss(method: str, monkeypatch) -> None:
    model = _model(["DISTILL.GATE", "harmony", "DISTILL.METHOD", method])
    batch = synthetic_batch(2, 64, seed=3)
    model.train()
    seen: list[int] = []

    def zero_gates(mode, teacher, student, margin):
        gates = [torch.zeros_like(t.p_c) for t in teacher]
        seen.append(len(gates))
        return gates

    monkeypatch.setattr(distiller_module, "level_gates", zero_gates)
    with torch.jit.optimized_execution(False), EventStorage(0):
        torch.manual_seed(1)
        reference = copy.deepcopy(model.student)(batch)  # the student alone (its own loss normaliser)
        torch.manual_seed(1)
        losses = model(batch)
    assert seen == [len(model.strides)]
    distill = {k: v for k, v in losses.items() if k not in reference}
    assert set(distill) == ({"loss_hd", "loss_tfd"} if method == "tbd" else {"loss_mimic"})
    assert all(v.item() == 0.0 for v in distill.values())
    assert sum(losses.values()).item() == sum(reference.values()).item()

    # and with a gate of 1 everywhere the terms are the ungated ones
    monkeypatch.setattr(
        distiller_module, "level_gates", lambda m, t, s, g: [torch.ones_like(x.p_c) for x in t]
    )
    with EventStorage(0):
        gated = model(batch)
    model.gate = "none"
    with EventStorage(0):
        plain = model(batch)
    for key in distill:
        assert gated[key].item() == pytest.approx(plain[key].item(), rel=1e-6) and plain[key].item() > 0


def test_gate_config_is_validated() -> None:
    with pytest.raises(ValueError, match="DISTILL.GATE"):
        _model(["DISTILL.GATE", "always"])
    with pytest.raises(ValueError, match="GATE_MARGIN"):
        _model(["DISTILL.GATE", "iou", "DISTILL.GATE_MARGIN", "-0.1"])
    with pytest.raises(ValueError, match="WITH_BASELINE"):
        _model(["DISTILL.BASELINE_GUARD", "scale"])
