"""TBDistiller end to end on tiny inputs: pairs, gradients, probes, checkpoints, refusals."""

from __future__ import annotations

import logging

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import tbd
import tbd.distill
from tbd.distill import Probe, TBDistiller, get_probe_adapter
from tbd.distill.testing import distill_config, synthetic_batch

SMALL = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(student: str, teacher: str, opts: list[str] | None = None) -> TBDistiller:
    torch.manual_seed(0)
    # the paper's ungated terms: with random models a gate may switch whole levels off (the gate's
    # own tests: tests/test_gate.py)
    model = build_model(distill_config(student, teacher, SMALL + ["DISTILL.GATE", "none"] + (opts or [])))
    assert isinstance(model, TBDistiller)
    return model


@pytest.fixture(scope="module")
def retina_pair() -> TBDistiller:
    return _build("retinanet_R18_FPN", "retinanet_R18_FPN")


def _train_step(model: TBDistiller, batch: list[dict]) -> tuple[dict[str, torch.Tensor], EventStorage]:
    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage() as storage:
        losses = model(batch)
        sum(losses.values()).backward()
    return losses, storage


def test_public_surface() -> None:
    assert tbd.TBDistiller is TBDistiller
    cfg = tbd.get_cfg()
    assert cfg.DISTILL.HD_WEIGHT == 1.0 and cfg.DISTILL.PC_MODE == "sigmoid"
    cfg2 = tbd.get_cfg()
    tbd.distill.add_tbd_config(cfg2)  # idempotent
    assert cfg2.DISTILL.TFD_MODE == "twg"


def test_training_forward_adds_weighted_losses_and_scalars(retina_pair: TBDistiller) -> None:
    losses, storage = _train_step(retina_pair, synthetic_batch(2, 64))
    assert {"loss_cls", "loss_box_reg", "loss_hd", "loss_tfd"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    hist = storage.histories()
    assert losses["loss_hd"].item() == pytest.approx(
        retina_pair.hd_weight * hist["tbd/hd"].latest(), rel=1e-5
    )
    assert losses["loss_tfd"].item() == pytest.approx(
        retina_pair.tfd_weight * hist["tbd/tfd"].latest(), rel=1e-5
    )
    assert hist["tbd/twg_w_cls_s8"].latest() == pytest.approx(0.5)  # TWG starts at (0.5, 0.5)
    assert retina_pair.strides == [8, 16, 32, 64, 128]


def test_gradients_reach_student_adapters_twg_never_teacher(retina_pair: TBDistiller) -> None:
    _train_step(retina_pair, synthetic_batch(2, 64, seed=1))
    teacher = retina_pair.teacher
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    own = {id(p) for p in retina_pair.parameters()}
    assert not own & {id(p) for p in teacher.parameters()}  # the optimizer never sees them
    assert not any(k.startswith("teacher") or "_teacher" in k for k in retina_pair.state_dict())
    assert retina_pair.student.head.cls_score.weight.grad.abs().sum() > 0
    assert retina_pair.student.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0
    for layer in retina_pair.adapters.layers.values():
        assert layer.weight.grad.abs().sum() > 0
    assert retina_pair.twg.fc2.weight.grad.abs().sum() > 0
    assert not teacher.training and retina_pair.student.training


def test_student_hd_gradient_flows_through_logits_and_boxes(retina_pair: TBDistiller) -> None:
    """With beta = 0 and no detection loss, HD alone must move the student's cls and box layers."""
    model = retina_pair
    model.train()
    batch = synthetic_batch(2, 64, seed=2)
    with EventStorage():
        with model._probe.capture():
            model.student(batch)
        s_levels = model._probe.levels()
    t_levels = model.teacher_levels(batch)
    from tbd.ops.boxes import pad_boxes

    gt, _, mask = pad_boxes([x["instances"].gt_boxes.tensor for x in batch])
    model.zero_grad(set_to_none=True)
    s_maps = model.task_maps(s_levels, gt, mask)
    t_maps = model.task_maps(t_levels, gt, mask)
    from tbd.distill import harmony_distillation_loss

    harmony_distillation_loss(t_maps, s_maps, "plain").backward()
    head = model.student.head
    assert head.cls_score.weight.grad.abs().sum() > 0
    assert head.bbox_pred.weight.grad.abs().sum() > 0
    assert all(t.logits.grad_fn is None and t.boxes.grad_fn is None for t in t_levels)


def test_eval_forward_is_the_students(retina_pair: TBDistiller) -> None:
    retina_pair.eval()
    batch = synthetic_batch(1, 64, seed=3)
    with torch.no_grad():
        out = retina_pair(batch)
        ref = retina_pair.student(batch)
    assert len(out) == 1 and "instances" in out[0]
    assert torch.equal(out[0]["instances"].scores, ref[0]["instances"].scores)


def test_probe_matches_model_internals(retina_pair: TBDistiller) -> None:
    """Hooked outputs, decoded with the model's transform, equal a manual run of the same parts."""
    student = retina_pair.student
    student.eval()
    batch = synthetic_batch(1, 64, seed=4)
    probe = Probe(student)
    try:
        with torch.no_grad(), probe.capture():
            student(batch)
        levels = probe.levels()
    finally:
        probe.remove()
    with torch.no_grad():
        images = student.preprocess_image(batch)
        feats = student.backbone(images.tensor)
        features = [feats[f] for f in student.head_in_features]
        logits, deltas = student.head(features)
        anchors = student.anchor_generator(features)
    lv = levels[1]
    assert lv.stride == 16 and torch.equal(lv.feature, features[1])
    a, k = 9, 8
    h, w = features[1].shape[-2:]
    assert lv.logits.shape == (1, h, w, a, k)
    # location (0, 1), anchor 2, class 5 -> channel 2 * K + 5 of the head's map
    assert lv.logits[0, 0, 1, 2, 5] == logits[1][0, 2 * k + 5, 0, 1]
    idx = (0 * w + 1) * a + 2
    expected = student.box2box_transform.apply_deltas(
        deltas[1][0, 2 * 4 : 3 * 4, 0, 1][None], anchors[1].tensor[idx][None]
    )
    assert torch.allclose(lv.boxes[0, 0, 1, 2], expected[0])


@pytest.mark.parametrize(
    ("student", "teacher", "opts", "strides"),
    [
        # different FPN channels -> 1x1 adapter 64 -> 128
        ("retinanet_R18_FPN", "retinanet_R18_FPN", ["MODEL.FPN.OUT_CHANNELS", "64"], [8, 16, 32, 64, 128]),
        # Faster R-CNN teacher (RPN, 3 anchors, p2-p6) -> RetinaNet student (9 anchors, p3-p7)
        ("retinanet_R18_FPN", "faster_rcnn_R18_FPN", [], [8, 16, 32, 64]),
        # RetinaNet teacher -> FCOS student (1 point per location)
        ("fcos_R18_FPN", "retinanet_R18_FPN", [], [8, 16, 32, 64, 128]),
        # FCOS teacher -> Faster R-CNN student
        ("faster_rcnn_R18_FPN", "fcos_R18_FPN", [], [8, 16, 32, 64]),
        # tbd's own student heads (probe adapters in tbd/modeling/*/probe.py)
        ("tood_R18_FPN", "retinanet_R18_FPN", [], [8, 16, 32, 64, 128]),
        ("et_R18_FPN", "retinanet_R18_FPN", [], [8, 16, 32, 64, 128]),
        ("dw_R18_FPN", "fcos_R18_FPN", [], [8, 16, 32, 64, 128]),
    ],
)
def test_heterogeneous_pairs(student: str, teacher: str, opts: list[str], strides: list[int]) -> None:
    model = _build(student, teacher, opts)
    assert model.strides == strides
    losses, _ = _train_step(model, synthetic_batch(2, 64, seed=5))
    assert torch.isfinite(losses["loss_hd"]) and torch.isfinite(losses["loss_tfd"])
    assert losses["loss_tfd"].item() > 0
    for layer in model.adapters.layers.values():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    if opts:
        assert model.adapters.layers["8"].in_channels == 64 and model.adapters.layers["8"].out_channels == 128


def test_one_sided_levels_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tbd.distill.distiller"):
        model = _build("retinanet_R18_FPN", "faster_rcnn_R18_FPN")
    msgs = [r.getMessage() for r in caplog.records if "one side only" in r.getMessage()]
    assert len(msgs) == 1 and "[4, 128]" in msgs[0]
    with caplog.at_level(logging.WARNING, logger="tbd.distill.distiller"):
        caplog.clear()
        _train_step(model, synthetic_batch(2, 64))
    assert not [r for r in caplog.records if "one side only" in r.getMessage()]


def test_empty_images_and_degenerate_boxes_are_finite(retina_pair: TBDistiller) -> None:
    batch = synthetic_batch(3, 64, boxes_per_image=[0, 2, 1], seed=6)
    batch[1]["instances"].gt_boxes.tensor[0] = torch.tensor([10.0, 10.0, 10.0, 30.0])  # zero width
    retina_pair.train()
    retina_pair.zero_grad(set_to_none=True)
    with EventStorage():
        losses = retina_pair(batch)
    # (Detectron2's own box loss is inf on a zero-width GT: log(0) in its targets; not ours)
    assert torch.isfinite(losses["loss_hd"]) and torch.isfinite(losses["loss_tfd"])
    (losses["loss_hd"] + losses["loss_tfd"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in retina_pair.parameters() if p.grad is not None)
    empty = synthetic_batch(2, 64, boxes_per_image=0, seed=7)
    losses, storage = _train_step(retina_pair, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_hd"].item() == 0.0  # p_r^t = 0 everywhere -> psi = 0 on every level
    assert storage.histories()["tbd/tfd_reg"].latest() == 0.0
    for p in retina_pair.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


def test_fixed_weights_plain_hd_and_pc_modes() -> None:
    for pc_mode in ("spatial_softmax", "softmax_max1"):
        model = _build(
            "retinanet_R18_FPN",
            "retinanet_R18_FPN",
            ["DISTILL.TFD_MODE", "fixed", "DISTILL.HD_MODE", "plain", "DISTILL.PC_MODE", pc_mode],
        )
        assert model.twg is None
        losses, storage = _train_step(model, synthetic_batch(2, 64, seed=8))
        assert torch.isfinite(losses["loss_hd"]) and losses["loss_hd"].item() > 0
        hist = storage.histories()
        assert hist["tbd/tfd"].latest() == pytest.approx(
            hist["tbd/tfd_cls"].latest() + hist["tbd/tfd_reg"].latest()
        )


def test_teacher_bf16_autocast() -> None:
    """DISTILL.TEACHER_AMP bf16: the teacher's layers compute in bfloat16 (seen by hooks inside its
    forward), the student's in float32; the levels handed on are float32 and close to, but not
    equal to, the float32 teacher's."""
    model = _build("retinanet_R18_FPN", "retinanet_R18_FPN", ["DISTILL.TEACHER_AMP", "bf16"])
    assert model.teacher_amp == "bf16"
    seen: dict[str, list[torch.dtype]] = {"teacher": [], "student": []}
    hooks = [
        m.backbone.bottom_up.stem.conv1.register_forward_hook(
            lambda mod, inp, out, who=who: seen[who].append(out.dtype)
        )
        for who, m in (("teacher", model.teacher), ("student", model.student))
    ]
    hooks += [
        model.teacher.head.cls_score.register_forward_hook(lambda m, i, o: seen["teacher"].append(o.dtype))
    ]
    batch = synthetic_batch(2, 64, seed=9)
    try:
        losses, _ = _train_step(model, batch)
        assert len(seen["teacher"]) == 6 and set(seen["teacher"]) == {torch.bfloat16}  # stem, 5 levels
        assert seen["student"] == [torch.float32]
        low = model.teacher_levels(batch)
        model.teacher_amp = ""
        seen["teacher"].clear()
        ref = model.teacher_levels(batch)
        assert len(seen["teacher"]) == 6 and set(seen["teacher"]) == {torch.float32}
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(losses["loss_tfd"]) and torch.isfinite(losses["loss_hd"])
    for a, b in zip(ref, low):
        assert b.feature.dtype == b.logits.dtype == b.boxes.dtype == torch.float32
        rel = ((a.feature - b.feature).norm() / a.feature.norm()).item()
        assert 0 < rel < 0.1  # rounded to bfloat16 on the way, but the same features


def test_checkpoints_export_and_load_plain_student(retina_pair: TBDistiller, tmp_path) -> None:
    sd = retina_pair.state_dict()
    assert any(k.startswith("student.") for k in sd)
    assert any(k.startswith("adapters.") for k in sd) and any(k.startswith("twg.") for k in sd)
    path = tmp_path / "student.pth"
    retina_pair.export_student(path)
    exported = torch.load(path, weights_only=False)["model"]
    assert set(exported) == set(retina_pair.student.state_dict())

    # the export loads, strictly, into a plain student built from the student's config
    cfg = distill_config("retinanet_R18_FPN", "retinanet_R18_FPN", SMALL)
    cfg.MODEL.META_ARCHITECTURE = cfg.DISTILL.STUDENT_META_ARCHITECTURE
    plain = build_model(cfg)
    plain.load_state_dict(exported, strict=True)

    # and a plain student checkpoint loads into a fresh distiller through DetectionCheckpointer
    fresh = _build("retinanet_R18_FPN", "retinanet_R18_FPN")
    fresh.student.head.cls_score.weight.data.zero_()
    DetectionCheckpointer(fresh).load(str(path))
    assert torch.equal(fresh.student.head.cls_score.weight, retina_pair.student.head.cls_score.weight)
    # a full training checkpoint round-trips with adapters and TWG
    fresh.load_state_dict(retina_pair.state_dict(), strict=True)
    for k, v in retina_pair.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_refuses_class_mismatch_and_unconvertible_formats() -> None:
    with pytest.raises(ValueError, match="classes"):
        _build("retinanet_R18_FPN", "retinanet_R18_FPN", ["MODEL.RETINANET.NUM_CLASSES", "5"])
    with pytest.raises(ValueError, match="input format"):
        _build("retinanet_R18_FPN", "retinanet_R18_FPN", ["DISTILL.TEACHER_OPTS", "['INPUT.FORMAT', 'L']"])
    with pytest.raises(ValueError, match="STUDENT_META_ARCHITECTURE"):
        _build("retinanet_R18_FPN", "retinanet_R18_FPN", ["DISTILL.STUDENT_META_ARCHITECTURE", ""])
    with pytest.raises(FileNotFoundError, match="TEACHER_WEIGHTS"):
        _build("retinanet_R18_FPN", "retinanet_R18_FPN", ["DISTILL.TEACHER_WEIGHTS", "/nonexistent/t.pth"])
    with pytest.raises(ValueError, match="PC_MODE"):
        _build("retinanet_R18_FPN", "retinanet_R18_FPN", ["DISTILL.PC_MODE", "softmax"])
    with pytest.raises(TypeError, match="no TBD probe adapter"):
        get_probe_adapter(torch.nn.Linear(2, 2))


def test_rgb_teacher_gets_flipped_channels() -> None:
    model = _build(
        "retinanet_R18_FPN", "retinanet_R18_FPN", ["DISTILL.TEACHER_OPTS", "['INPUT.FORMAT', 'RGB']"]
    )
    assert model._flip_teacher_channels
    batch = synthetic_batch(1, 64, seed=10)
    flipped = [{**x, "image": x["image"].flip(0)} for x in batch]
    got = model.teacher_levels(batch)
    ref = model.teacher_adapter.run_dense(model.teacher, flipped)
    assert torch.equal(got[0].feature, ref[0].feature)


def test_teacher_weights_are_loaded(tmp_path) -> None:
    donor = _build("retinanet_R18_FPN", "retinanet_R18_FPN")
    path = tmp_path / "teacher.pth"
    torch.save({"model": donor.student.state_dict()}, path)
    model = _build("retinanet_R18_FPN", "retinanet_R18_FPN", ["DISTILL.TEACHER_WEIGHTS", str(path)])
    assert torch.equal(model.teacher.head.cls_score.weight, donor.student.head.cls_score.weight)
    assert get_probe_adapter(model.teacher).strides(model.teacher) == [8, 16, 32, 64, 128]
