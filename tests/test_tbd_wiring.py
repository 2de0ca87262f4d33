"""TBD's wiring, recomputed by hand: HD, TFD and TWG from both models' probed levels.

The distiller's ``loss_hd`` / ``loss_tfd`` of one training forward must equal the formulas of
METHODS.md §1 written out here with explicit teacher and student arguments (own p_c, p_r, HS,
IoU-guided weight, teacher-energy distance, TFD masks, TWG), with alpha, beta, omega_c, omega_r
and the TWG floor all different from each other and from their defaults. The pair is asymmetric
(Faster R-CNN teacher: RPN, 3 anchors, 1 logit; RetinaNet student: 9 anchors, 8 classes) and the
teacher pads its input to a larger multiple, so three levels differ in size and are cropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import Tensor
from torchvision.ops import box_iou

from tbd.distill import Probe, TBDistiller
from tbd.distill.probes import LevelPrediction
from tbd.distill.testing import distill_config, synthetic_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALPHA, BETA = 0.7, 0.3  # DISTILL.HD_WEIGHT, DISTILL.TFD_WEIGHT (defaults 1.0, 0.4)
OMEGA_C, OMEGA_R = 0.8, 0.15  # DISTILL.TFD_CLS_WEIGHT, TFD_REG_WEIGHT (defaults 0.5, 0.5)
TWG_FLOOR = 0.05  # DISTILL.TWG.MIN_WEIGHT (default 0.1)
IMAGE = 80  # the student pads to 96 (p3 12x12), the teacher (see _build) to 128 (p3 16x16)
SMALL = ["INPUT.MIN_SIZE_TRAIN", f"({IMAGE},)", "INPUT.MAX_SIZE_TRAIN", str(IMAGE)]


def _build(tfd_mode: str, hd_mode: str) -> TBDistiller:
    torch.manual_seed(0)
    opts = SMALL + [
        "DISTILL.HD_WEIGHT", str(ALPHA), "DISTILL.TFD_WEIGHT", str(BETA),
        "DISTILL.TFD_CLS_WEIGHT", str(OMEGA_C), "DISTILL.TFD_REG_WEIGHT", str(OMEGA_R),
        "DISTILL.TWG.MIN_WEIGHT", str(TWG_FLOOR), "DISTILL.TWG.HIDDEN_DIM", "8",
        "DISTILL.TFD_MODE", tfd_mode, "DISTILL.HD_MODE", hd_mode,
        # the paper's ungated terms (the gate's own by-hand wiring test: tests/test_gate.py)
        "DISTILL.GATE", "none",
    ]  # fmt: skip
    model = build_model(distill_config("retinanet_R18_FPN", "faster_rcnn_R18_FPN", opts))
    assert isinstance(model, TBDistiller)
    # a backbone that pads to a larger multiple (as a ViT/Swin teacher would): levels of
    # different sizes, which the distiller crops to their common top-left part
    model.teacher.backbone._size_divisibility = 128
    if model.twg is not None:
        # TWG starts at exactly (0.5, 0.5) whatever its inputs: give it weights that read them
        torch.manual_seed(1)
        torch.nn.init.normal_(model.twg.fc1.weight, std=1.0)
        torch.nn.init.normal_(model.twg.fc2.weight, std=0.5)
    return model


# ---------------------------------------------------------------------------- METHODS.md §1, by hand
@dataclass
class Maps:
    p_c: Tensor  # [B, H, W]
    p_r: Tensor  # [B, H, W]


def hand_maps(level: LevelPrediction, gts: list[Tensor]) -> Maps:
    """p_c = sigmoid(max raw logit over anchors and classes); p_r = max over anchors and GTs of IoU."""
    b, h, w, a, _ = level.boxes.shape
    p_c = level.logits.reshape(b, h, w, -1).max(dim=-1).values.sigmoid()
    p_r = []
    for i in range(b):  # test code: one image at a time, torchvision's IoU
        iou = box_iou(level.boxes[i].reshape(-1, 4), gts[i]) if len(gts[i]) else None
        flat = iou.max(dim=1).values if iou is not None else level.boxes.new_zeros(h * w * a)
        p_r.append(flat.reshape(h, w, a).max(dim=-1).values)
    return Maps(p_c, torch.stack(p_r))


def hand_hd(t: list[Maps], s: list[Maps], mode: str) -> Tensor:
    """Plain: mean |HS^t - HS^s|; IoU-guided: weighted by psi = p_r^t sqrt(1 + |p_c^t - p_c^s|)."""
    total = 0.0
    for mt, ms in zip(t, s):
        hs_t = 1 - torch.tanh((mt.p_r - mt.p_c).abs()).detach()
        hs_s = 1 - torch.tanh((ms.p_r - ms.p_c).abs())
        gap = (hs_t - hs_s).abs()
        if mode == "plain":
            total = total + gap.mean(dim=(1, 2))
        else:
            psi = (mt.p_r * torch.sqrt(1 + (mt.p_c - ms.p_c).abs())).detach()
            den = psi.sum(dim=(1, 2))
            total = total + torch.where(den > 0, (psi * gap).sum(dim=(1, 2)) / den.clamp(min=1e-30), 0.0)
    return total.mean()


def hand_distances(model: TBDistiller, t_lv: list[LevelPrediction], s_lv: list[LevelPrediction]) -> list:
    """sum_c (F^t - phi(F^s))^2 / E^t, E^t = mean_ij sum_c (F^t)^2 per image; a level with
    E^t < 1e-4 max_l E^t is flat (distance 0)."""
    energies = [t.feature.pow(2).sum(dim=1).mean(dim=(1, 2)) for t in t_lv]
    top = torch.stack(energies).max(dim=0).values
    out = []
    for t, s, e in zip(t_lv, s_lv, energies):
        conv = model.adapters.layers[str(s.stride)]
        adapted = F.conv2d(s.feature, conv.weight, conv.bias)
        scale = torch.where(e < 1e-4 * top, 0.0, 1.0 / e.clamp(min=1e-6))
        out.append((t.feature - adapted).pow(2).sum(dim=1) * scale[:, None, None])
    return out


def hand_twg(model: TBDistiller, t: list[Maps], s: list[Maps]) -> Tensor:
    """[B, L, 2]: GAP of (p_c^t, p_r^t, p_c^s, p_r^s) -> fc1 -> ReLU -> fc2 -> m + (1 - 2m) softmax."""
    twg = model.twg
    pooled = torch.stack(
        [torch.stack([mt.p_c, mt.p_r, ms.p_c, ms.p_r], dim=-1).mean(dim=(1, 2)) for mt, ms in zip(t, s)],
        dim=1,
    ).detach()
    hidden = torch.relu(pooled @ twg.fc1.weight.T + twg.fc1.bias)
    return TWG_FLOOR + (1 - 2 * TWG_FLOOR) * torch.softmax(hidden @ twg.fc2.weight.T + twg.fc2.bias, dim=-1)


def hand_tfd(distances: list[Tensor], t: list[Maps], weights: Tensor) -> Tensor:
    """sum_l w_c,l mean_{p_c^t}(d_l) + w_r,l mean_{p_r^t}(d_l), averaged over images."""
    total = 0.0
    for level, (d, mt) in enumerate(zip(distances, t)):
        for task, mask in enumerate((mt.p_c.detach(), mt.p_r.detach())):
            den = mask.sum(dim=(1, 2))
            mean = torch.where(den > 0, (mask * d).sum(dim=(1, 2)) / den.clamp(min=1e-30), 0.0)
            w = weights[task] if weights.dim() == 1 else weights[:, level, task]
            total = total + w * mean
    return total.mean()


def hand_losses(
    model: TBDistiller, teacher: list[LevelPrediction], student: list[LevelPrediction], gts: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """(alpha L_HD, beta L_TFD) from explicit teacher and student levels."""
    t_by, s_by = {lv.stride: lv for lv in teacher}, {lv.stride: lv for lv in student}
    t_lv, s_lv = [], []
    for stride in (8, 16, 32, 64):  # the strides both models have
        t, s = t_by[stride], s_by[stride]
        h, w = min(t.size[0], s.size[0]), min(t.size[1], s.size[1])
        t_lv.append(LevelPrediction(stride, t.feature[..., :h, :w], t.logits[:, :h, :w], t.boxes[:, :h, :w]))
        s_lv.append(LevelPrediction(stride, s.feature[..., :h, :w], s.logits[:, :h, :w], s.boxes[:, :h, :w]))
    t_maps = [hand_maps(lv, gts) for lv in t_lv]
    s_maps = [hand_maps(lv, gts) for lv in s_lv]
    hd = hand_hd(t_maps, s_maps, model.hd_mode)
    weights = hand_twg(model, t_maps, s_maps) if model.twg is not None else torch.tensor([OMEGA_C, OMEGA_R])
    tfd = hand_tfd(hand_distances(model, t_lv, s_lv), t_maps, weights)
    return ALPHA * hd, BETA * tfd


# ---------------------------------------------------------------------------- the distiller vs by hand
def _forward(model: TBDistiller, batch: list[dict]) -> tuple[dict, list, list, dict]:
    """One training forward; the student's levels as it computed them, the teacher's by its own run."""
    model.train()
    probe = Probe(model.student)
    try:
        with EventStorage() as storage, probe.capture():
            losses = model(batch)
        student = probe.levels()
    finally:
        probe.remove()
    with torch.no_grad():
        teacher = model.teacher_adapter.run_dense(model.teacher, batch)
    scalars = {k: v.latest() for k, v in storage.histories().items()}
    return losses, teacher, student, scalars


@pytest.fixture(scope="module")
def batch() -> list[dict]:
    return synthetic_batch(2, IMAGE, boxes_per_image=[3, 1], seed=11)


def _gts(batch: list[dict]) -> list[Tensor]:
    return [x["instances"].gt_boxes.tensor for x in batch]


@pytest.mark.parametrize(("tfd_mode", "hd_mode"), [("fixed", "iou_guided"), ("twg", "plain")])
def test_losses_equal_the_formulas_by_hand(batch: list[dict], tfd_mode: str, hd_mode: str) -> None:
    model = _build(tfd_mode, hd_mode)
    losses, teacher, student, scalars = _forward(model, batch)
    t_sizes = {lv.stride: lv.size for lv in teacher}
    s_sizes = {lv.stride: lv.size for lv in student}
    assert t_sizes[8] == (16, 16) and s_sizes[8] == (12, 12)  # the crop is exercised
    hd, tfd = hand_losses(model, teacher, student, _gts(batch))
    assert losses["loss_hd"].item() == pytest.approx(hd.item(), rel=1e-5)
    assert losses["loss_tfd"].item() == pytest.approx(tfd.item(), rel=1e-5)
    assert scalars["tbd/hd"] == pytest.approx(hd.item() / ALPHA, rel=1e-5)
    # the gradients too: what is a constant (teacher, psi, TWG inputs) and what is not
    params = [
        model.student.head.cls_score.weight,
        model.student.head.bbox_pred.weight,
        model.student.backbone.fpn_output3.weight,
        model.adapters.layers["16"].weight,
    ]
    if model.twg is not None:
        params.append(model.twg.fc2.weight)
    for got, want in ((losses["loss_hd"], hd), (losses["loss_tfd"], tfd)):
        g_got = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
        g_want = torch.autograd.grad(want, params, retain_graph=True, allow_unused=True)
        for p, a, b in zip(params, g_got, g_want):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_teacher_and_student_are_not_interchangeable(batch: list[dict]) -> None:
    """The same formulas with the roles swapped give clearly different values: the equality
    above pins the roles (a swapped HD call, TFD masks from the student, swapped omegas, TWG
    inputs in another order would each fail it)."""
    model = _build("twg", "iou_guided")
    losses, teacher, student, _ = _forward(model, batch)
    gts = _gts(batch)
    hd, tfd = hand_losses(model, teacher, student, gts)
    assert losses["loss_hd"].item() == pytest.approx(hd.item(), rel=1e-5)
    assert losses["loss_tfd"].item() == pytest.approx(tfd.item(), rel=1e-5)
    # the alternatives the equality rules out differ by more than its tolerance
    t_lv = [lv for lv in teacher if lv.stride in (8, 16, 32, 64)]
    s_lv = [lv for lv in student if lv.stride in (8, 16, 32, 64)]
    crop = [(min(t.size[0], s.size[0]), min(t.size[1], s.size[1])) for t, s in zip(t_lv, s_lv)]
    t_lv = [t.crop(*c) for t, c in zip(t_lv, crop)]
    s_lv = [s.crop(*c) for s, c in zip(s_lv, crop)]
    t_maps = [hand_maps(lv, gts) for lv in t_lv]
    s_maps = [hand_maps(lv, gts) for lv in s_lv]
    with torch.no_grad():
        d = hand_distances(model, t_lv, s_lv)
        w = hand_twg(model, t_maps, s_maps)
        w_swapped = hand_twg(model, s_maps, t_maps)
        assert (w - w_swapped).abs().max() > 0.05  # TWG reads its inputs
        pc_pr_swapped = [Maps(m.p_r, m.p_c) for m in t_maps]
        alternatives = {
            "hd swapped": ALPHA * hand_hd(s_maps, t_maps, "iou_guided"),
            "tfd masks of the student": BETA * hand_tfd(d, s_maps, w),
            "tfd task weights swapped": BETA * hand_tfd(d, t_maps, w.flip(-1)),
            "twg inputs teacher <-> student": BETA * hand_tfd(d, t_maps, w_swapped),
            "twg inputs p_c^t <-> p_r^t": BETA * hand_tfd(d, t_maps, hand_twg(model, pc_pr_swapped, s_maps)),
        }
    for name, value in alternatives.items():
        ref = hd if name.startswith("hd") else tfd
        assert abs(value.item() - ref.item()) > 1e-3 * abs(ref.item()), name


# ---------------------------------------------------------------------------- the ablations
def _ablation(opts: list[str]) -> tuple[TBDistiller, dict, dict]:
    torch.manual_seed(0)
    model = build_model(distill_config("retinanet_R18_FPN", "retinanet_R18_FPN", SMALL + opts))
    model.train()
    with EventStorage() as storage:
        losses = model(synthetic_batch(2, IMAGE, boxes_per_image=[3, 1], seed=11))
    return model, losses, {k: v.latest() for k, v in storage.histories().items()}


def _grads(loss: Tensor, params: list[torch.nn.Parameter]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def test_hd_weight_zero_has_no_hd_term_and_no_hd_gradient() -> None:
    ref_model, ref, _ = _ablation(["DISTILL.HD_WEIGHT", "0.6"])
    model, losses, scalars = _ablation(["DISTILL.HD_WEIGHT", "0.0"])
    assert ref["loss_hd"].item() > 0.01  # the term the ablation removes is not empty
    assert losses["loss_hd"].item() == 0.0
    assert not [k for k in scalars if k == "tbd/hd"]  # not computed, not logged
    # TFD and the detector's losses are those of the same model with HD on
    for key in ("loss_tfd", "loss_cls", "loss_box_reg"):
        assert losses[key].item() == pytest.approx(ref[key].item(), rel=1e-6), key
    params = [p for p in model.parameters() if p.requires_grad]
    # switched off, the term is a constant: no graph at all (or, built, an all-zero gradient)
    assert not losses["loss_hd"].requires_grad or all(
        g.abs().sum() == 0 for g in _grads(losses["loss_hd"], params)
    )
    ref_params = [ref_model.student.head.cls_score.weight, ref_model.student.head.bbox_pred.weight]
    assert all(g.abs().sum() > 0 for g in _grads(ref["loss_hd"], ref_params))
    _every_parameter_gets_a_gradient(model, losses)
    _every_parameter_gets_a_gradient(ref_model, ref)


def test_tfd_weight_zero_has_no_tfd_term_and_no_tfd_gradient() -> None:
    ref_model, ref, _ = _ablation(["DISTILL.TFD_WEIGHT", "0.3"])
    model, losses, scalars = _ablation(["DISTILL.TFD_WEIGHT", "0.0"])
    assert ref["loss_tfd"].item() > 0.01
    assert losses["loss_tfd"].item() == 0.0
    assert not [k for k in scalars if k.startswith(("tbd/tfd", "tbd/twg"))]
    for key in ("loss_hd", "loss_cls", "loss_box_reg"):
        assert losses[key].item() == pytest.approx(ref[key].item(), rel=1e-6), key
    params = [p for p in model.parameters() if p.requires_grad]
    # switched off, the term is a constant: no graph at all (or, built, an all-zero gradient)
    assert not losses["loss_tfd"].requires_grad or all(
        g.abs().sum() == 0 for g in _grads(losses["loss_tfd"], params)
    )
    fpn = [ref_model.student.backbone.fpn_output3.weight, *ref_model.adapters.parameters()]
    assert all(g.abs().sum() > 0 for g in _grads(ref["loss_tfd"], fpn))
    # nothing is left that no loss uses (DistributedDataParallel refuses parameters without a
    # gradient at the second step): no adapters, no TWG
    assert model.twg is None and not list(model.adapters.parameters())
    _every_parameter_gets_a_gradient(model, losses)


def _every_parameter_gets_a_gradient(model: TBDistiller, losses: dict) -> None:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        sum(losses.values()), [p for p in model.parameters() if p.requires_grad], allow_unused=True
    )
    assert not [n for n, g in zip(names, grads) if g is None]


def test_level_crop_keeps_the_top_left_locations() -> None:
    """Padding is bottom/right, so the common part of two levels is their top-left corner."""
    feature = torch.arange(2 * 3 * 4 * 5.0).view(2, 3, 4, 5)
    logits = torch.arange(2 * 4 * 5 * 2 * 1.0).view(2, 4, 5, 2, 1)
    boxes = torch.arange(2 * 4 * 5 * 2 * 4.0).view(2, 4, 5, 2, 4)
    level = LevelPrediction(16, feature, logits, boxes)
    assert level.crop(4, 5) is level
    small = level.crop(3, 2)
    assert small.stride == 16 and small.size == (3, 2)
    assert torch.equal(small.feature, feature[:, :, :3, :2])
    assert torch.equal(small.logits, logits[:, :3, :2]) and torch.equal(small.boxes, boxes[:, :3, :2])
