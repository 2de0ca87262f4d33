"""Peer baselines (DISTILL.METHOD mimic_mse / cls_mask_mimic): hand-worked values and the distiller path."""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tbd.distill import TBDistiller, validate_tbd_config
from tbd.distill.peers import cls_mask_mimic_loss, mimic_mse_loss, peer_loss
from tbd.distill.testing import distill_config, synthetic_batch

SMALL = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- the losses by hand
def test_mimic_mse_hand_worked() -> None:
    # one image; level 1 (2x2) distances 1, 2, 3, 6 -> mean 3; level 2 (1x1) distance 5 -> mean 5
    d1 = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
    d2 = torch.tensor([[[5.0]]])
    assert mimic_mse_loss([d1, d2]).item() == pytest.approx((3.0 + 5.0) / 2)
    # two images: averaged over images (image 2 all zeros)
    d1b = torch.cat([d1, torch.zeros_like(d1)])
    d2b = torch.cat([d2, torch.zeros_like(d2)])
    assert mimic_mse_loss([d1b, d2b]).item() == pytest.approx(4.0 / 2)


def test_cls_mask_mimic_hand_worked() -> None:
    d1 = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
    pc1 = torch.tensor([[[0.5, 0.0], [0.0, 0.25]]])  # (0.5*1 + 0.25*6) / 0.75 = 2/0.75
    d2 = torch.tensor([[[5.0, 7.0]]])
    pc2 = torch.tensor([[[0.2, 0.2]]])  # uniform weight -> plain mean 6
    expected = 2.0 / 0.75 + 6.0  # levels are summed, like TFD
    assert cls_mask_mimic_loss([d1, d2], [pc1, pc2]).item() == pytest.approx(expected)
    # the mask is what matters: a uniform mask reproduces the level mean
    uniform = torch.full_like(pc1, 0.3)
    assert cls_mask_mimic_loss([d1], [uniform]).item() == pytest.approx(3.0)


def test_cls_mask_mimic_zero_mask_is_zero_not_nan() -> None:
    d = torch.rand(2, 3, 3)
    pc = torch.zeros(2, 3, 3)
    pc[1, 0, 0] = 1.0  # image 0: empty mask -> 0; image 1: only location (0, 0)
    loss = cls_mask_mimic_loss([d], [pc])
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(d[1, 0, 0].item() / 2)


def test_peer_loss_dispatch_and_errors() -> None:
    d = [torch.tensor([[[2.0, 4.0]]])]
    assert peer_loss("mimic_mse", d).item() == pytest.approx(3.0)
    assert peer_loss("cls_mask_mimic", d, [torch.tensor([[[1.0, 0.0]]])]).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="p_c"):
        peer_loss("cls_mask_mimic", d)
    with pytest.raises(ValueError, match="unknown peer"):
        peer_loss("fgd", d)
    with pytest.raises(ValueError, match="one p_c map per level"):
        cls_mask_mimic_loss(d, [])


def test_config_validates_method() -> None:
    cfg = distill_config(opts=["DISTILL.METHOD", "mimic_mse"])
    validate_tbd_config(cfg)
    cfg.DISTILL.METHOD = "fgd"
    with pytest.raises(ValueError, match="DISTILL.METHOD"):
        validate_tbd_config(cfg)
    cfg.DISTILL.METHOD = "mimic_mse"
    cfg.DISTILL.FEATURE_NORM = "l2"
    with pytest.raises(ValueError, match="DISTILL.FEATURE_NORM"):
        validate_tbd_config(cfg)


# ---------------------------------------------------------------------------- through the distiller
def _build(method: str, extra: list[str] | None = None) -> TBDistiller:
    torch.manual_seed(0)
    # ungated (the gate on the peers is tested in tests/test_gate.py)
    opts = SMALL + [
        "DISTILL.METHOD",
        method,
        "DISTILL.MIMIC_WEIGHT",
        "0.01",
        "DISTILL.GATE",
        "none",
        *(extra or []),
    ]
    model = build_model(distill_config("retinanet_R18_FPN", "retinanet_R18_FPN", opts))
    assert isinstance(model, TBDistiller)
    return model


@pytest.mark.parametrize("method", ["mimic_mse", "cls_mask_mimic"])
def test_peer_gradients_reach_student_and_adapter_never_teacher(method: str) -> None:
    model = _build(method)
    assert model.twg is None  # a peer has no TWG parameters left without gradient
    model.train()
    batch = synthetic_batch(2, 64, seed=3)
    with EventStorage() as storage:
        losses = model(batch)
    assert "loss_mimic" in losses and not {"loss_hd", "loss_tfd"} & set(losses)
    assert losses["loss_mimic"].item() > 0
    assert losses["loss_mimic"].item() == pytest.approx(
        0.01 * storage.histories()[f"tbd/{method}"].latest(), rel=1e-5
    )
    model.zero_grad(set_to_none=True)
    losses["loss_mimic"].backward()  # the peer loss alone
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    adapter_grads = [p.grad for p in model.adapters.parameters()]
    assert adapter_grads and all(g is not None and g.abs().sum() > 0 for g in adapter_grads)
    fpn_grads = [p.grad for p in model.student.backbone.parameters() if p.grad is not None]
    assert fpn_grads and any(g.abs().sum() > 0 for g in fpn_grads)
    # the feature loss does not reach the student's head (only the FPN features are mimicked)
    head = model.student.head
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.parameters())


def test_peer_losses_match_the_functions_on_captured_levels() -> None:
    """The distiller's loss equals the hand formula applied to the probed features."""
    from tbd.distill.losses import feature_distance
    from tbd.distill.task_probs import classification_probability
    from tbd.ops.boxes import pad_boxes

    model = _build("cls_mask_mimic")
    model.train()
    batch = synthetic_batch(2, 64, seed=4)
    gt, _, mask = pad_boxes([x["instances"].gt_boxes.tensor for x in batch])
    with EventStorage(), torch.no_grad(), model._probe.capture():
        model.student(batch)
    s_levels = model._probe.levels()
    t_levels = model.teacher_levels(batch)
    with EventStorage(), torch.no_grad():
        got = model.distillation_losses(t_levels, s_levels, gt, mask)["loss_mimic"]
        d = [
            feature_distance(t.feature, model.adapters(s.feature, s.stride), model.feature_norm)
            for t, s in zip(t_levels, s_levels)
        ]
        pc = [classification_probability(t.logits, "sigmoid") for t in t_levels]
        # hand formula, written out without the shared helper
        want = sum(((p * x).flatten(1).sum(1) / p.flatten(1).sum(1)) for x, p in zip(d, pc)).mean()
        mse = torch.stack([x.flatten(1).mean(1) for x in d], 1).mean(1).mean()
    assert got.item() == pytest.approx(0.01 * want.item(), rel=1e-5)
    model.method = "mimic_mse"
    with torch.no_grad():
        got_mse = model.distillation_losses(t_levels, s_levels, gt, mask)["loss_mimic"]
    assert got_mse.item() == pytest.approx(0.01 * mse.item(), rel=1e-5)
